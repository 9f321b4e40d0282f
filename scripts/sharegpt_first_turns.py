"""Write the first user turns of the packaged ShareGPT file as JSONL, in file order, with their ids.

`fastdecode train data --source FILE` on that file selects exactly what `--source sharegpt` selects (same
turns, same order, same seed): the device machine has no network and only 64 MiB travel per command, so
this extract travels instead of the 27 MB wheel (4.4 MB gzipped: name OUT with .jsonl.gz).
    python scripts/sharegpt_first_turns.py OUT.jsonl[.gz]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastdecode.train.data import file_sha256, first_turns, sharegpt_path


def main() -> None:
    out = Path(sys.argv[1])
    src = sharegpt_path()
    turns = first_turns(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    import gzip

    with (gzip.open(out, "wt", encoding="utf-8") if out.suffix == ".gz" else out.open("w", encoding="utf-8")) as f:
        for cid, text in turns:
            f.write(json.dumps({"id": cid, "conversations": [{"from": "human", "value": text}]}, ensure_ascii=False) + "\n")
    print(f"{len(turns)} first turns of {src.name} (sha256 {file_sha256(src)[:16]}) -> {out}")


if __name__ == "__main__":
    main()
