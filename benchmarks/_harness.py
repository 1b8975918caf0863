"""Shared timing helpers for deformcp's benchmarks (benchmarks/bench_<op>.py).

Run every benchmark with OpenBLAS's CPU overrides unset, in the command only:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_<op>.py

(these machines set OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which slow NumPy's BLAS). Whether they
were set is recorded in every results file (:func:`machine_info`).

What is here:

- :func:`measure`: warm-up calls (a count and a minimum time), then ``repeat`` timed calls
  (``time.perf_counter``), with an optional ``sync`` callable run before the clock starts and before
  it stops (GPU work is asynchronous: pass ``cupy.cuda.Device().synchronize`` /
  ``torch.cuda.synchronize``). Returns a :class:`Timing` (median, quartiles, min, spread, and how
  busy other processes kept the CPUs meanwhile, :class:`OtherLoad`).
  :func:`measure_interleaved` times several callables in turns instead.
- :func:`cpu_busy`, :func:`busy_warning`: is the machine quiet enough to benchmark?
- :class:`Record`: one result row (case, implementation, phase, timing, free-form extras).
- :func:`machine_info`: platform, CPU count, library versions, thread settings, BLAS env overrides;
  :func:`command_line`, :func:`blas_warning`.
- :func:`markdown_table`, :func:`machine_markdown`, :func:`format_seconds`, :func:`ratio_text`: reporting.
- :func:`write_results`: ``benchmarks/results/<name>.json`` and ``benchmarks/results/<name>.md``.
- :func:`relative_error`: ‖a − b‖ / ‖b‖ in float64, to check results before timing them;
  :func:`to_numpy`, :func:`errors_text`.

What a bench_<op>.py script shares (each compares deformcp with a torch-based baseline):

- :func:`add_arguments` (--device, --repeat, --warmup, --quick, --interleave, --torch-threads, --seed,
  --output) and :func:`start`, which turns them into a :class:`Plan` (how to time) after the checks
  every run makes first (BLAS overrides, --device cuda without a GPU).
- :func:`device_setup`: what can run on ``--device`` (deformcp's host backend, torch on CUDA), the
  synchronisation to time CUDA work with, and the machine entries (:class:`DeviceSetup`).
- :func:`time_phases`: time each phase of a set of implementations, printing a line per result.
- :func:`ratio`, :func:`timing_headers`, :func:`timing_cells`, :func:`evaluate_targets`,
  :func:`report_markdown`, :func:`results_payload`, :func:`save_results`: the results files.

Only the standard library and NumPy are needed; torch and threadpoolctl are reported when installed.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
#: Environment variables that slow NumPy's BLAS on these machines; benchmarks run with them unset.
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: Thread-count variables recorded with the results.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ------------------------------------------------------------------------------------------------ timing

@dataclasses.dataclass
class Timing:
    """Wall-clock times of ``repeat`` calls, in seconds, and how busy other processes kept the CPUs."""

    samples: list[float]
    warmup: int
    others_busy: Optional[float] = None   # fraction of all CPUs used by other processes meanwhile

    @property
    def repeat(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def q25(self) -> float:
        return float(np.percentile(self.samples, 25))

    @property
    def q75(self) -> float:
        return float(np.percentile(self.samples, 75))

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = the middle half lies within 5 %)."""
        return (self.q75 - self.q25) / self.median if self.median > 0 else 0.0

    def summary(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "q25_s": self.q25,
                "q75_s": self.q75, "spread": self.spread, "repeat": self.repeat, "warmup": self.warmup,
                "others_busy": self.others_busy, "samples_s": self.samples}


class OtherLoad:
    """Fraction of all CPUs that *other* processes used between start() and stop(): /proc/stat's busy
    time minus this process's own CPU time (Linux; None elsewhere). A multi-threaded library loses
    whole scheduler ticks when a core is taken, so a benchmark wants this near 0."""

    MIN_WINDOW = 0.3  # seconds; shorter windows give None

    def __init__(self):
        self._start = None

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as stat:
                values = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(values) - values[3] - (values[4] if len(values) > 4 else 0)  # minus idle, iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()

    def start(self) -> "OtherLoad":
        self._start = self._read()
        return self

    def stop(self) -> Optional[float]:
        end = self._read()
        if self._start is None or end is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self._start, end))
        cpus = os.cpu_count() or 1
        if wall < self.MIN_WINDOW:  # /proc/stat counts in ticks (10 ms): too coarse for short windows
            return None
        return min(1.0, max(0.0, (busy - own) / (wall * cpus)))


def measure(fn: Callable[[], Any], repeat: int = 20, warmup: int = 2,
            sync: Optional[Callable[[], None]] = None, min_time: float = 0.0,
            warmup_time: float = 0.0) -> Timing:
    """Time ``fn()`` after untimed warm-up calls (compilation, caches, allocator, thread pools): at
    least ``warmup`` calls and at least ``warmup_time`` seconds of them (torch's CPU kernels, for one,
    take some 50 ms of calls to settle).

    ``sync`` runs before the clock starts and before it stops (asynchronous devices). With
    ``min_time`` > 0, the timed calls go on past ``repeat`` until their total reaches ``min_time``
    seconds (at most 10 × repeat calls), which steadies the median of very short calls.
    """
    return measure_interleaved({"fn": fn}, repeat, warmup, sync, min_time, warmup_time)["fn"]


def measure_interleaved(fns: dict[str, Callable[[], Any]], repeat: int = 20, warmup: int = 2,
                        sync: Optional[Callable[[], None]] = None, min_time: float = 0.0,
                        warmup_time: float = 0.0) -> dict[str, Timing]:
    """Like :func:`measure` for several callables, timed in turns (one call of each per round), so
    that a change in the machine's load during the run touches every one of them alike."""
    if repeat < 1:
        raise ValueError(f"repeat: expected at least 1, got {repeat}")
    sync = sync or (lambda: None)
    warmed = {name: 0 for name in fns}
    for name, fn in fns.items():
        start = time.perf_counter()
        while warmed[name] < warmup or time.perf_counter() - start < warmup_time:
            fn()
            sync()
            warmed[name] += 1
    samples: dict[str, list[float]] = {name: [] for name in fns}
    load = OtherLoad().start()
    rounds = 0
    while rounds < repeat or (min(sum(s) for s in samples.values()) < min_time and rounds < 10 * repeat):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
        rounds += 1
    others = load.stop()
    return {name: Timing(s, warmed[name], others) for name, s in samples.items()}


@dataclasses.dataclass
class Record:
    """One result: ``impl`` running ``phase`` of ``case`` took ``timing``."""

    case: str                       # e.g. "8x64x56x56 bilinear zeros"
    impl: str                       # e.g. "deformcp numpy", "torch cpu"
    phase: str                      # e.g. "forward", "forward+backward"
    timing: Timing
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"case": self.case, "impl": self.impl, "phase": self.phase, **self.timing.summary(),
                **self.extra}


# ------------------------------------------------------------------------------------------------ checks

from deformcp.testing import relative_error  # noqa: E402  (one definition of the error measure)


def to_numpy(a) -> np.ndarray:
    """A NumPy copy of a NumPy, CuPy or torch array."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return a.get() if hasattr(a, "get") else np.asarray(a)


def errors_text(errors: dict) -> str:
    """``name 1.2e-06, name 3.4e-07``: relative errors as printed and reported."""
    return ", ".join(f"{k} {v:.1e}" for k, v in errors.items())


# ----------------------------------------------------------------------------------------------- machine

def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return None


def _module_version(name: str) -> Optional[str]:
    """Version of an imported module (None where it is not imported: not installed, or not used)."""
    module = sys.modules.get(name)
    return getattr(module, "__version__", None) if module is not None else None


def blas_overrides() -> dict[str, Optional[str]]:
    """The BLAS override variables and their values (None where unset)."""
    return {name: os.environ.get(name) for name in BLAS_OVERRIDES}


def blas_warning() -> Optional[str]:
    """A warning line when a BLAS override is set, else None."""
    present = {k: v for k, v in blas_overrides().items() if v is not None}
    if not present:
        return None
    listing = ", ".join(f"{k}={v}" for k, v in present.items())
    return (f"warning: {listing} set; NumPy's BLAS runs slower. Rerun as "
            f"env -u {' -u '.join(BLAS_OVERRIDES)} python {' '.join(sys.argv)}")


def cpu_busy(interval: float = 0.5) -> Optional[float]:
    """Fraction of all CPUs that other processes keep busy, sampled over ``interval`` seconds."""
    load = OtherLoad().start()
    time.sleep(interval)
    return load.stop()


def busy_warning(busy: Optional[float], threshold: float = 0.1) -> Optional[str]:
    if busy is None or busy <= threshold:
        return None
    return (f"warning: other processes keep {busy:.0%} of the CPUs busy; timings will be noisy and "
            "multi-threaded libraries slowed (run on a quiet machine)")


def command_line() -> str:
    """The command that ran this benchmark, with the ``env -u`` prefix where the BLAS overrides were
    unset (their presence is visible here, and in :func:`machine_info`)."""
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "<stdin>"
    command = " ".join(["python", script, *sys.argv[1:]])
    if any(v is not None for v in blas_overrides().values()):
        overrides = ", ".join(f"{k}={v}" for k, v in blas_overrides().items() if v is not None)
        return f"{command}  (with {overrides} set)"
    return f"env -u {' -u '.join(BLAS_OVERRIDES)} {command}"


def thread_info() -> dict:
    """Threads each library will use: torch, threadpoolctl's view of BLAS/OpenMP (when installed)."""
    info: dict[str, Any] = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    try:
        import threadpoolctl
    except ImportError:
        info["threadpools"] = "threadpoolctl not installed"
    else:
        info["threadpools"] = [{k: pool.get(k) for k in ("user_api", "internal_api", "num_threads",
                                                          "version", "architecture")}
                               for pool in threadpoolctl.threadpool_info()]
    return info


def machine_info(extra: Optional[dict] = None) -> dict:
    """Where the numbers came from. Call after importing the libraries being timed."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model() or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": _version("scipy"),
        "torch": _module_version("torch"),
        "cupy": _module_version("cupy"),
        "blas_overrides": blas_overrides(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "threads": thread_info(),
    }
    info.update(extra or {})
    return info


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------- reporting

def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def ratio_text(ratio: Optional[float]) -> str:
    return "—" if ratio is None else f"{ratio:.2f}×"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table, columns padded so that it also reads as plain text."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in cells[1:])])


def machine_markdown(info: dict) -> str:
    """Markdown bullet list of :func:`machine_info`'s main fields."""
    threads = info.get("threads", {})
    overrides = info.get("blas_overrides", {})
    set_ = {k: v for k, v in overrides.items() if v is not None}
    pools = threads.get("threadpools")
    if isinstance(pools, list):
        pools = ", ".join(f"{p['internal_api']} {p['num_threads']}" for p in pools) or "none loaded"
    lines = [
        f"- machine: {info.get('processor')}, {info.get('cpu_count')} CPUs "
        f"({info.get('cpus_usable')} usable), {info.get('platform')}",
        f"- python {info.get('python')}, numpy {info.get('numpy')}, scipy {info.get('scipy')}, "
        f"torch {info.get('torch') or 'not installed'}"
        + (f", cupy {info['cupy']}" if info.get("cupy") else ""),
        f"- threads: torch {threads.get('torch_threads', '—')}, OMP_NUM_THREADS="
        f"{threads.get('OMP_NUM_THREADS') or 'unset'}, threadpools: {pools}",
        "- BLAS overrides: " + (", ".join(f"{k}={v} (SET: NumPy BLAS slowed)" for k, v in set_.items())
                                if set_ else f"{', '.join(BLAS_OVERRIDES)} unset (as required)"),
    ]
    busy = [info.get(k) for k in ("cpu_busy_before", "cpu_busy_after")]
    if any(b is not None for b in busy):
        lines.append("- other processes' load: "
                     + " / ".join("—" if b is None else f"{b:.0%}" for b in busy)
                     + " of the CPUs before / after the run"
                     + (" (NOISY: timings unreliable)" if any(b is not None and b > 0.1 for b in busy)
                        else ""))
    for key in ("device", "gpu"):
        if info.get(key):
            lines.append(f"- {key}: {info[key]}")
    return "\n".join(lines)


def write_results(name: str, payload: dict, markdown: str, directory: pathlib.Path = RESULTS_DIR
                  ) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``<directory>/<name>.json`` (``payload`` plus a timestamp) and ``<name>.md``; a name with a
    directory part (``/tmp/run1``) is written there instead."""
    target = pathlib.Path(name)
    if target.parent != pathlib.Path("."):
        directory, name = target.parent, target.name
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name,
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **payload}
    json_path, md_path = directory / f"{name}.json", directory / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, Timing):
        return value.summary()
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ------------------------------------------------------------------------------------ a bench_<op>.py run

def add_arguments(parser: argparse.ArgumentParser, results_name: str) -> None:
    """The options every benchmark takes; ``results_name`` is the default results name."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per measurement (default 30)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first, and at least 0.25 s of them (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 repeats, 1 warm-up call; writes no files unless --output is given")
    parser.add_argument("--interleave", action="store_true",
                        help="time the implementations in turns, one call each per round (evens out drifting "
                             "machine load; every call then starts with caches holding the others' data)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads(N) first (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None,
                        help="results name: benchmarks/results/<name>.{json,md}, or a path without suffix "
                             f"(default {results_name}, or {results_name}_cuda)")


@dataclasses.dataclass
class Plan:
    """How every row is timed: ≥ ``warmup`` warm-up calls and ≥ ``warmup_time`` seconds of them, then
    ``repeat`` timed calls, the implementations back to back or (``interleave``) in turns."""

    repeat: int
    warmup: int
    warmup_time: float
    interleave: bool

    def describe(self) -> str:
        """The line printed before timing."""
        return (f"timing: {self.warmup} warm-up calls (and ≥ {self.warmup_time:g} s) + {self.repeat} timed "
                "calls each, " + ("implementations in turns (--interleave)" if self.interleave
                                  else "back to back"))

    def method(self) -> str:
        """The results' description of the timing."""
        return (f"≥ {self.warmup} warm-up calls and ≥ {self.warmup_time:g} s, then {self.repeat} timed calls "
                "per row, " + ("implementations in turns" if self.interleave else "each row's calls back to back"))

    def time(self, fns: dict[str, Callable[[], Any]], sync=None) -> dict[str, Timing]:
        if self.interleave:
            return measure_interleaved(fns, repeat=self.repeat, warmup=self.warmup, sync=sync,
                                       warmup_time=self.warmup_time)
        return {name: measure(fn, repeat=self.repeat, warmup=self.warmup, sync=sync,
                              warmup_time=self.warmup_time)
                for name, fn in fns.items()}


def start(parser: argparse.ArgumentParser, args: argparse.Namespace, torch=None) -> Optional[Plan]:
    """The :class:`Plan` of :func:`add_arguments`' options, after what every run does first: check
    them, apply --torch-threads (``torch``: the module, or None), warn about BLAS overrides. None, with a
    message, where --device cuda has no GPU to run on."""
    repeat = args.repeat or (3 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if repeat < 1 or warmup < 0:
        parser.error("--repeat must be at least 1 and --warmup at least 0")
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            parser.error("--torch-threads must be at least 1")
        if torch is not None:
            torch.set_num_threads(args.torch_threads)
    warning = blas_warning()
    if warning:
        print(warning, file=sys.stderr)
    if args.device == "cuda":
        from deformcp.testing import gpu_available

        problem = gpu_available()
        if problem:
            print(f"--device cuda: {problem}. Nothing timed; run without --device cuda for the CPU "
                  "benchmark.", file=sys.stderr)
            return None
    return Plan(repeat, warmup, 0.0 if args.quick else 0.25, args.interleave)


@dataclasses.dataclass
class DeviceSetup:
    """What runs on the benchmark's device (see :func:`device_setup`)."""

    device: str                      # "cpu" or "cuda"
    info: dict                       # machine_info entries: device, and on CUDA gpu and torch_cuda
    notes: list[str]                 # what cannot run here
    sync: Optional[Callable[[], None]] = None  # run around timed calls (CUDA)
    host: bool = False               # cpu: deformcp's host backend can be compiled
    torch_device: Any = None         # where the torch baseline runs; None: it cannot run here


def device_setup(device: str, torch=None) -> DeviceSetup:
    """``device`` "cpu": whether deformcp's host backend has a compiler. "cuda": CuPy's current device,
    and whether ``torch`` (the module, or None) can run there too; ``sync`` then waits for both."""
    if device == "cpu":
        from deformcp import _host

        setup = DeviceSetup("cpu", {"device": "cpu"}, [], host=_host.compiler() is not None,
                            torch_device="cpu" if torch is not None else None)
        if not setup.host:
            setup.notes.append("deformcp host skipped: no C++ compiler found (set CXX)")
        return setup
    import cupy

    cuda = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(cuda.id)["name"]
    info = {"device": f"cuda:{cuda.id}", "torch_cuda": torch.version.cuda if torch is not None else None,
            "gpu": f"{name.decode() if isinstance(name, bytes) else name} (compute capability "
                   f"{cuda.compute_capability}), CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"}
    torch_cuda = torch is not None and torch.cuda.is_available()
    notes = []
    if torch is not None and not torch_cuda:
        notes.append(f"torch {torch.__version__} has no CUDA device here: deformcp times only")

    def sync():
        cuda.synchronize()                   # cudaDeviceSynchronize: every stream of the device, CuPy's ...
        if torch_cuda:
            torch.cuda.synchronize(cuda.id)  # ... and torch's (its caching allocator included)

    return DeviceSetup("cuda", info, notes, sync, torch_device=torch.device("cuda", cuda.id) if torch_cuda else None)


def check_load() -> Optional[float]:
    """:func:`cpu_busy`, printing :func:`busy_warning`'s warning where there is one."""
    busy = cpu_busy()
    warning = busy_warning(busy)
    if warning:
        print(warning, file=sys.stderr)
    return busy


#: The method of an implementation object that each phase times.
PHASE_METHODS = {"forward": "forward", "backward": "backward", "forward+backward": "forward_backward"}


def time_phases(plan: Plan, impls: dict, phases: Sequence[str], sync, case: str, baseline: Optional[str],
                extra: Optional[dict] = None, label: str = "") -> list[Record]:
    """Time each implementation's method of every phase (:data:`PHASE_METHODS`), printing a line per
    result (``label`` first); the Records of ``case`` with ``extra``."""
    extra, records = extra or {}, []
    for phase in phases:
        fns = {name: getattr(impl, PHASE_METHODS[phase]) for name, impl in impls.items()}
        timings = plan.time(fns, sync)
        records += [Record(case, name, phase, timing, dict(extra)) for name, timing in timings.items()]
        for name, timing in timings.items():
            value = ratio(records, baseline, name, phase, **extra) if name != baseline else None
            print(f"  {label}{phase:<17} {name:<16} median {format_seconds(timing.median):>10}  "
                  f"spread {timing.spread * 100:4.1f}%  other load {load_text(timing)}"
                  + ("" if value is None else f"  {value:.2f}× {baseline}"))
    return records


def load_text(timing: Timing) -> str:
    return "—" if timing.others_busy is None else f"{timing.others_busy:.0%}"


def ratio(records: Sequence[Record], baseline: Optional[str], impl: str, phase: str, **extra) -> Optional[float]:
    """``impl``'s median / ``baseline``'s median for ``phase`` (and records whose extra has ``extra``'s
    entries, such as op=...); None where either is missing."""
    def median(name):
        found = [r for r in records if r.impl == name and r.phase == phase
                 and all(r.extra.get(k) == v for k, v in extra.items())]
        return found[0].timing.median if found else None

    mine, base = median(impl), median(baseline)
    return mine / base if mine is not None and base is not None else None


def timing_headers(baseline: Optional[str]) -> list[str]:
    """The results table's timing columns (after the columns naming the row)."""
    return ["median", "p25–p75", "min", "runs", "other load", f"÷ {baseline}" if baseline else "ratio"]


def timing_cells(records: Sequence[Record], record: Record, baseline: Optional[str]) -> list:
    """``record``'s cells under :func:`timing_headers`, its ratio to the baseline's alike record."""
    t = record.timing
    return [format_seconds(t.median), f"{format_seconds(t.q25)}–{format_seconds(t.q75)}",
            format_seconds(t.min), t.repeat, load_text(t),
            ratio_text(ratio(records, baseline, record.impl, record.phase, **record.extra))]


#: A target's own entries; the others (impl, phase, op ...) say which result it is about.
TARGET_FIELDS = ("max_ratio", "ratio", "status", "target")


def evaluate_targets(targets: Sequence[dict], records: Sequence[Record], baseline: Optional[str],
                     default_case: bool, missing: str) -> list[dict]:
    """Each target (``impl``, ``phase``, any extra entries such as ``op``, ``max_ratio``: the most
    implementation / baseline may be, ``target``: what that means) with its ``ratio`` and ``status``:
    met, MISSED, ``missing`` (no ratio), or not applicable outside the default case."""
    evaluated = []
    for target in targets:
        where = {k: v for k, v in target.items() if k not in TARGET_FIELDS}
        value = ratio(records, baseline, **where)
        limit = target["max_ratio"]
        status = (missing if value is None else ("met" if value <= limit else "MISSED") if default_case
                  else "not applicable: the targets are set for the default case")
        evaluated.append({**where, "max_ratio": limit, "ratio": value, "status": status,
                          "target": target["target"]})
    return evaluated


def report_markdown(*, title: str, case_lines: Sequence[str], command: str, method: str, machine: dict,
                    baseline: Optional[str], compared: str, no_baseline: str, headers: Sequence[str],
                    rows: Sequence[Sequence[Any]], targets: Sequence[dict], verification: str,
                    errors: dict[str, dict], notes: Sequence[str]) -> str:
    """The results markdown. ``compared``: what a ratio keeps alike ("phase"); ``no_baseline``: why
    there is no baseline, where ``baseline`` is None ("No torch baseline (torch is not installed)");
    ``verification``: what the errors are ("relative errors against torch cpu"); ``errors``: per
    implementation (a line each), the relative errors."""
    lines = [
        f"# deformcp benchmark: {title}",
        "",
        *case_lines,
        "",
        f"Command: `{command}`. Timing: {method}.",
        "",
        machine_markdown(machine),
        "",
        (f"Ratio = implementation's median / {baseline}'s median for the same {compared}: **below 1 is "
         f"faster than {baseline}**." if baseline
         else f"**{no_baseline}: deformcp times only, no ratios.**"),
        "",
        markdown_table(headers, rows),
        "",
        "Targets:",
        "",
        *(" ".join(["-", *(str(v) for k, v in t.items() if k not in TARGET_FIELDS)])
          + f": {t['target']} (ratio ≤ {t['max_ratio']:g}): "
          + (f"{t['ratio']:.2f}× — " if t["ratio"] is not None else "") + t["status"]
          for t in targets),
        "",
        f"Verification before timing ({verification}):",
        "",
        *(f"- {name}: {errors_text(e)}" for name, e in errors.items()),
    ]
    if notes:
        lines += ["", *(f"Note: {n}" for n in notes)]
    return "\n".join(lines)


def no_baseline(library: str, module) -> str:
    """Why there is no ``library`` baseline (``module``: the imported module, or None)."""
    why = f"{library} is not installed" if module is None else f"{library} cannot run on this device"
    return f"No {library} baseline ({why})"


def results_payload(command: str, case: dict, *, plan: Plan, baseline: Optional[str], compared: str,
                    machine: dict, errors: dict, targets: list, notes: list, records: Sequence[Record]) -> dict:
    """The results JSON: the command, the ``case``'s entries, then how it was timed and the results."""
    return {"command": command, **case, "baseline": baseline, "interleave": plan.interleave,
            "repeat": plan.repeat, "warmup": plan.warmup,
            "ratio_meaning": f"implementation median / baseline median, same {compared}; < 1 is faster",
            "machine": machine, "verification": errors, "targets": targets, "notes": notes,
            "results": [r.to_dict() for r in records]}


def save_results(args: argparse.Namespace, results_name: str, payload: dict, markdown: str) -> None:
    """:func:`write_results` under --output, or else ``results_name`` (``_cuda`` added for --device
    cuda) except with --quick, which writes nothing."""
    name = args.output or (None if args.quick else results_name + ("_cuda" if args.device == "cuda" else ""))
    if name:
        json_path, md_path = write_results(name, payload, markdown)
        print(f"\nwrote {json_path} and {md_path}")
