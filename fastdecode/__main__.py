from fastdecode.cli import main

raise SystemExit(main())
