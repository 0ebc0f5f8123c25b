"""Request streams for the simulator: Poisson arrivals, an Azure trace, or a closed loop of clients.

Length specs: "4096", "fixed:4096", "uniform:512,16384", "lognormal:2048,1.0" (median, log-sd), "exp:256",
"choice:512,2048,8192". Azure trace CSVs: TIMESTAMP (seconds or a datetime), ContextTokens, GeneratedTokens.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from fapool.sim.errors import SimInputError

TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
DEFAULT_PROMPT = "lognormal:4096,1.0"  # median 4K tokens, long tail (clipped to max_len)
DEFAULT_OUTPUT = "lognormal:256,0.8"


@dataclass(frozen=True)
class LengthDist:
    kind: str
    params: tuple[float, ...]
    lo: int = 1
    hi: int = 1 << 20

    @classmethod
    def parse(cls, spec: str, lo: int = 1, hi: int = 1 << 20) -> LengthDist:
        kind, _, rest = str(spec).strip().partition(":")
        if not rest:
            kind, rest = "fixed", kind
        kind = kind.lower()
        try:
            params = tuple(float(x) for x in rest.split(",") if x.strip())
        except ValueError:
            raise SimInputError(f"bad length distribution {spec!r}: parameters must be numbers") from None
        arity = {"fixed": (1, 1), "uniform": (2, 2), "lognormal": (2, 2), "exp": (1, 1), "choice": (1, 64)}
        if kind not in arity:
            raise SimInputError(f"bad length distribution {spec!r}: kind must be one of {', '.join(arity)}")
        lo_n, hi_n = arity[kind]
        if not lo_n <= len(params) <= hi_n or any(p <= 0 for p in params):
            raise SimInputError(f"bad length distribution {spec!r}: needs {lo_n}..{hi_n} positive parameters")
        if kind == "uniform" and params[0] > params[1]:
            raise SimInputError(f"bad length distribution {spec!r}: low > high")
        if lo < 1 or hi < lo:
            raise SimInputError(f"bad length clip [{lo}, {hi}]")
        return cls(kind, params, lo, hi)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        p = self.params
        if self.kind == "fixed":
            x = np.full(n, p[0])
        elif self.kind == "uniform":
            x = rng.integers(int(p[0]), int(p[1]) + 1, size=n)
        elif self.kind == "lognormal":  # median p[0], log-sd p[1]
            x = np.exp(rng.normal(math.log(p[0]), p[1], size=n))
        elif self.kind == "exp":
            x = rng.exponential(p[0], size=n)
        else:
            x = rng.choice(np.asarray(p), size=n)
        return np.clip(np.rint(x), self.lo, self.hi).astype(np.int64)

    def __str__(self) -> str:
        if len(self.params) > 8:
            return f"{self.kind}:<{len(self.params)} values, mean {np.mean(self.params):.0f}>"
        return f"{self.kind}:{','.join(f'{v:g}' for v in self.params)}"


def steady_state_draw(prompt: LengthDist, output: LengthDist, rng: np.random.Generator):
    """(prompt, output, generated) of a decode slot in steady state: a request held with probability
    proportional to its output length, at a uniform age (sampling-importance-resampling)."""
    p, d = prompt.sample(rng, 256), output.sample(rng, 256)
    j = rng.choice(256, p=d / d.sum())
    return p[j], d[j], rng.integers(0, d[j])


@dataclass(frozen=True)
class RequestBatch:
    """Requests as columns. `generated` > 0 marks a request that enters mid-decode (the
    closed loop's stationary start): its context already holds prompt + generated tokens."""

    arrival: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    generated: np.ndarray
    client: np.ndarray  # closed-loop client id, -1 for open workloads
    warm: np.ndarray | None = None  # True: already decoding at t=0 (KV present, no latency stats)

    def __len__(self) -> int:
        return len(self.arrival)


def _seconds(text: str) -> float:
    """A TIMESTAMP: seconds, or a datetime (the Azure traces' form)."""
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text).timestamp()


def load_azure_trace(path: str | Path) -> RequestBatch:
    """A trace CSV's rows as open-loop requests, sorted, arrivals from the first."""
    path = Path(path)
    if not path.is_file():
        raise SimInputError(f"trace file not found: {path}")
    rows: list[tuple[float, int, int]] = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        names = [h.strip() for h in next(reader, [])]
        if missing := [c for c in TRACE_COLUMNS if c not in names]:
            raise SimInputError(f"{path}: header lacks column(s) {', '.join(missing)}; "
                                f"expected {', '.join(TRACE_COLUMNS)}")
        idx = [names.index(c) for c in TRACE_COLUMNS]
        for lineno, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            try:
                if len(row) < len(names):
                    raise ValueError(f"{len(row)} fields, header has {len(names)}")
                p, g = int(row[idx[1]]), int(row[idx[2]])
                if p < 1 or g < 0:
                    raise ValueError(f"ContextTokens must be >= 1 and GeneratedTokens >= 0, got {p}, {g}")
                rows.append((_seconds(row[idx[0]].strip()), p, max(1, g)))
            except ValueError as exc:
                raise SimInputError(f"{path}:{lineno}: malformed trace row {row!r}: {exc}") from exc
    if not rows:
        raise SimInputError(f"{path}: no requests in trace")
    rows.sort(key=lambda r: r[0])  # stable: equal times keep the file's order
    arrival, prompt, output = (np.array(col) for col in zip(*rows))
    n = len(rows)
    return RequestBatch(arrival - arrival[0], prompt, output, np.zeros(n, np.int64), np.full(n, -1))


class Workload(ABC):
    closed_loop: bool = False

    @abstractmethod
    def initial(self) -> RequestBatch:
        """Requests known at the start (all of an open workload)."""

    def replenish(self, client: int, now: float) -> tuple[int, int] | None:
        """Closed loop: the next (prompt_len, output_len) of `client`, or None to stop."""
        return None

    @abstractmethod
    def describe(self) -> str: ...


@dataclass
class PoissonWorkload(Workload):
    prompt: LengthDist
    output: LengthDist
    rate: float  # requests/s; math.inf = all arrive at t=0
    num_requests: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.num_requests < 1:
            raise SimInputError("Poisson workload needs rate > 0 and num_requests >= 1")

    def initial(self) -> RequestBatch:
        rng = np.random.default_rng([self.seed, 1])
        n = self.num_requests
        if math.isinf(self.rate):
            arrival = np.zeros(n)
        else:
            arrival = np.cumsum(rng.exponential(1.0 / self.rate, size=n))
            arrival -= arrival[0]
        prompt, output = self.prompt.sample(rng, n), self.output.sample(rng, n)
        return RequestBatch(arrival, prompt, output, np.zeros(n, np.int64), np.full(n, -1))

    def describe(self) -> str:
        rate = "burst" if math.isinf(self.rate) else f"{self.rate:g} req/s"
        return f"Poisson {rate}, {self.num_requests} requests, prompt {self.prompt}, output {self.output}"


@dataclass
class TraceWorkload(Workload):
    trace: RequestBatch  # load_azure_trace's
    speedup: float = 1.0  # arrivals come this many times faster than recorded
    name: str = "trace"

    def initial(self) -> RequestBatch:
        return dataclasses.replace(self.trace, arrival=self.trace.arrival / self.speedup)

    def describe(self) -> str:
        span = float(self.trace.arrival[-1]) / self.speedup
        return f"{self.name}: {len(self.trace)} requests over {span:.0f} s (speedup {self.speedup:g})"


@dataclass
class ClosedLoopWorkload(Workload):
    """`concurrency` clients, each sending its next request when its last finishes, until `num_requests`
    are sent; the first requests start mid-decode in steady state (steady_state_draw).
    Each client has its own random stream (common random numbers across concurrencies)."""

    prompt: LengthDist
    output: LengthDist
    concurrency: int
    num_requests: int
    seed: int = 0
    closed_loop: bool = True
    _rngs: list = field(default_factory=list, init=False, repr=False)
    _sent: int = field(default=0, init=False, repr=False)
    _buffers: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.num_requests < self.concurrency:
            raise SimInputError("closed loop needs concurrency >= 1 and num_requests >= concurrency")

    def initial(self) -> RequestBatch:
        self._rngs = [np.random.default_rng([self.seed, 3, c]) for c in range(self.concurrency)]
        self._buffers, self._sent = {}, self.concurrency
        c = self.concurrency
        draws = [steady_state_draw(self.prompt, self.output, rng) for rng in self._rngs]
        prompt, output, generated = (np.array(col, np.int64) for col in zip(*draws, strict=True))
        return RequestBatch(np.zeros(c), prompt, output, generated, np.arange(c), np.ones(c, bool))

    def replenish(self, client: int, now: float) -> tuple[int, int] | None:
        if self._sent >= self.num_requests:
            return None
        self._sent += 1
        buf = self._buffers.get(client)
        if not buf:  # draw a block at a time from the client's own stream (same for every run)
            rng = self._rngs[client]
            prompt, output = self.prompt.sample(rng, 64).tolist(), self.output.sample(rng, 64).tolist()
            self._buffers[client] = buf = list(zip(prompt, output, strict=True))[::-1]
        return buf.pop()

    def describe(self) -> str:
        return (f"closed loop, {self.concurrency} in flight, {self.num_requests} requests, "
                f"prompt {self.prompt}, output {self.output}")
