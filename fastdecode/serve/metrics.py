"""The server's Prometheus metrics, in a registry of its own (two servers in one process never share counts).

Acceptance per draft position follows vLLM's definition: of the steps that drafted at least k tokens deep,
the share whose k-th draft token was accepted (`accepted_at_position / drafted_at_position`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MAX_POSITION_LABEL = 32  # deeper draft positions are counted under this label


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fastdecode_requests", "requests answered, by route and outcome (ok, error, cancelled)",
                                ["route", "outcome"], registry=r)
        self.prompt_tokens = Counter("fastdecode_prompt_tokens", "prompt tokens of the requests run", registry=r)
        self.generation_tokens = Counter("fastdecode_generation_tokens", "new tokens emitted", registry=r)
        self.steps = Counter("fastdecode_steps", "target forwards in the decode loop (prefill is not a step)", registry=r)
        self.drafted = Counter("fastdecode_drafted_tokens", "draft nodes sent to the verifier", registry=r)
        self.accepted = Counter("fastdecode_accepted_tokens", "draft tokens accepted", registry=r)
        self.drafted_at = Counter("fastdecode_drafted_at_position", "steps whose draft reached this depth", ["position"], registry=r)
        self.accepted_at = Counter("fastdecode_accepted_at_position", "steps whose draft token at this depth was accepted",
                                   ["position"], registry=r)
        self.step_seconds = Histogram("fastdecode_step_seconds",
                                      "time of one decode step of one sequence (draft + verify, the wait for its batch included)",
                                      buckets=STEP_BUCKETS, registry=r)
        self.prefill_seconds = Histogram("fastdecode_prefill_seconds", "prefill time of one request", buckets=STEP_BUCKETS, registry=r)
        self.batch_sequences = Histogram("fastdecode_batch_sequences", "sequences per batched verify forward",
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_rows = Histogram("fastdecode_batch_rows", "rows (pending tokens, draft and lookahead rows) per batched verify forward",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.running = Gauge("fastdecode_running_sequences", "sequences being decoded", registry=r)
        self.waiting = Gauge("fastdecode_waiting_requests", "requests queued for a free slot", registry=r)
        # each position's child, looked up once: record_step runs for every step of every sequence
        self._drafted_at = [self.drafted_at.labels(str(k)) for k in range(1, MAX_POSITION_LABEL + 1)]
        self._accepted_at = [self.accepted_at.labels(str(k)) for k in range(1, MAX_POSITION_LABEL + 1)]

    def record_step(self, drafted_depth: int, drafted_nodes: int, accepted: int, seconds: float) -> None:
        self.steps.inc()
        self.step_seconds.observe(seconds)
        self.drafted.inc(drafted_nodes)
        self.accepted.inc(accepted)
        for child in self._drafted_at[:drafted_depth]:
            child.inc()
        for child in self._accepted_at[:accepted]:
            child.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
