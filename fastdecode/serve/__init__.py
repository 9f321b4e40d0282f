"""`fastdecode serve`: an OpenAI-compatible HTTP server over the engine (FastAPI on uvicorn).

app.py holds the routes, scheduler.py the thread that owns the model and interleaves the requests, protocol.py
the OpenAI wire format and its checks, metrics.py the Prometheus counters. Needs the `serve` extra
(`pip install 'fastdecode[serve]'`); importing this package without it raises ImportError.
"""

from fastdecode.serve.app import create_app
from fastdecode.serve.scheduler import Scheduler

__all__ = ["Scheduler", "create_app"]
