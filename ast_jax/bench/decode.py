"""Input decode throughput: clips/s that the trainer's input pipeline turns from audio files into batches, per host
core, to size the host CPUs that feed a pod's chips.

  python -m ast_jax.bench.decode                                       # 240 10-s clips per format, workers 0,1,2
  python -m ast_jax.bench.decode --workers=0,4,8 --json=bench_out/decode/decode.json
  python -m ast_jax.bench.decode --packed=false --mixup=0 --min_seconds=10

Clips: `--clips` 10-s (`--seconds`) 16-kHz mono 16-bit clips per format, FSDD speech (8 kHz, resampled once)
strung together with short pauses, at a random gain, plus noise at -50 dBFS (band-limited noise where FSDD is
missing), written as FLAC and WAV with an AST datafile JSON into a temporary folder (`--dir` keeps them). FLAC
compresses real audio much less than silence and more than white noise, so the clip's bytes are reported.

Cases: each format x `--workers` (Grain worker processes) drives the trainer's own input: `build_sources` and
`build_input` on the AudioSet recipe (configs/audioset.py: batch 12, 1024 frames, balanced sampling, waveform mixup
0.5, so about 1.5 files are decoded per clip) with only the datafile replaced; `--packed` adds ElasticAST's packed
rows (configs/audioset.py:elastic; read in threads of the main process, so workers=0 only). Each case is pinned to
max(1, workers) cores where the machine has them (the main process shares them with its workers), reads
`--warmup_batches` untimed batches (worker start-up), then at least `--batches` batches and `--min_seconds`.
The files sit in the page cache, so storage and network reads are not measured.

Columns: clips/s = clips in the timed batches / wall time; per_core = clips/s / cores pinned; cpu = CPU seconds of
the process and its workers per wall second (the reader threads of one process can use more than its pinned share
only when not pinned); clips_per_cpu_s = clips / CPU seconds: the cost that sizes a host. Floor rows time one thread
decoding the files one after another: `sf.read` (libsndfile alone), `load_audio` (+ checks, float32 mono) and
`record` (`TrainRecords`: + mean removal, mixup partner reads, pad or cut, labels). Each case records the load
averages before and after it: another busy process on the machine lowers every rate.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from typing import Any, Iterable, Iterator, Sequence

import ml_collections
import numpy as np
from absl import app, flags

from ast_jax.audio.io import load_audio, resample
from ast_jax.data import build_sources
from ast_jax.data.inputs import build_input
from ast_jax.data.pipeline import clip_samples
from ast_jax.data.reader import TrainRecords, WaveformReader
from ast_jax.data.sources import Example

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
NUM_CLASSES = 527  # the AudioSet recipe's head


# ----------------------------------------------------------------------------------------------- clips


def speech_stream(speech_dir: str, seconds: float, rng: np.random.Generator) -> np.ndarray | None:
  """At least `seconds` of FSDD recordings in random order with 0-0.3 s pauses, at 16 kHz `[samples]`; None
  without FSDD."""
  import soundfile as sf

  if not os.path.isdir(speech_dir):
    return None
  files = sorted(f for f in os.listdir(speech_dir) if f.endswith(".wav"))
  if not files:
    return None
  pieces, total = [], 0
  for name in rng.permutation(files):
    recording, rate = sf.read(os.path.join(speech_dir, name), dtype="float32")
    recording = recording if recording.ndim == 1 else recording.mean(axis=1)
    recording = resample(recording, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else recording
    pause = np.zeros(int(rng.uniform(0.0, 0.3) * SAMPLE_RATE), np.float32)
    pieces += [recording / max(1e-3, float(np.abs(recording).max())), pause]
    total += len(recording) + len(pause)
    if total >= seconds * SAMPLE_RATE:
      break
  stream = np.concatenate(pieces)
  return np.tile(stream, math.ceil(seconds * SAMPLE_RATE / len(stream)))  # FSDD holds about 20 minutes


def band_noise(samples: int, rng: np.random.Generator) -> np.ndarray:
  """Noise between 100 Hz and 4 kHz under a slow random envelope `[samples]`: the stand-in without FSDD."""
  spectrum = np.fft.rfft(rng.standard_normal(samples))
  frequencies = np.fft.rfftfreq(samples, 1.0 / SAMPLE_RATE)
  noise = np.fft.irfft(spectrum * ((frequencies > 100) & (frequencies < 4000)), samples)
  envelope = np.interp(np.arange(samples), np.linspace(0, samples, 12), rng.uniform(0.1, 1.0, 12))
  return (noise * envelope / np.abs(noise).max()).astype(np.float32)


def write_clips(folder: str, count: int, seconds: float, formats: Sequence[str], speech_dir: str,
                seed: int = 0) -> tuple[dict[str, list[str]], str]:
  """Writes `count` clips of `seconds` per format as 16-bit PCM: ({format: paths}, what the audio is)."""
  import soundfile as sf

  rng = np.random.default_rng(seed)
  samples = round(seconds * SAMPLE_RATE)
  stream = speech_stream(speech_dir, max(4 * seconds, min(count * seconds, 600.0)), rng)
  paths: dict[str, list[str]] = {fmt: [] for fmt in formats}
  for number in range(count):
    if stream is not None:
      start = int(rng.integers(0, len(stream) - samples + 1))
      clip = stream[start:start + samples] * rng.uniform(0.3, 0.9)
    else:
      clip = band_noise(samples, rng) * rng.uniform(0.3, 0.9)
    clip = np.clip(clip + 0.003 * rng.standard_normal(samples), -1.0, 1.0)
    for fmt in formats:
      path = os.path.join(folder, f"clip_{number:05d}.{fmt}")
      sf.write(path, clip, SAMPLE_RATE, subtype="PCM_16", format=fmt.upper())
      paths[fmt].append(path)
  if hasattr(os, "sync"):
    os.sync()  # the kernel's write-back of fresh files would otherwise run during the first timings
  return paths, "FSDD speech + noise at -50 dBFS" if stream is not None else "band-limited noise"


def write_datafile(folder: str, name: str, paths: Sequence[str], seed: int = 0) -> tuple[str, str]:
  """An AST datafile JSON over `paths` (1-3 random labels each) and its 527-class label CSV: (json, csv)."""
  rng = np.random.default_rng(seed)
  label_csv = os.path.join(folder, "labels.csv")
  with open(label_csv, "w", encoding="utf-8") as handle:
    handle.write("index,mid,display_name\n" + "".join(f"{i},/m/c{i},class {i}\n" for i in range(NUM_CLASSES)))
  entries = [{"wav": path, "labels": ",".join(f"/m/c{c}" for c in rng.choice(NUM_CLASSES, rng.integers(1, 4),
                                                                           replace=False))} for path in paths]
  datafile = os.path.join(folder, f"{name}.json")
  with open(datafile, "w", encoding="utf-8") as handle:
    json.dump({"data": entries}, handle)
  return datafile, label_csv


# ----------------------------------------------------------------------------------------------- measuring


def recipe_config(datafile: str, label_csv: str, *, workers: int = 0, packed: bool = False, batch: int = 0,
                  mixup: float | None = None) -> ml_collections.ConfigDict:
  """The AudioSet recipe (or its ElasticAST form) reading `datafile`, with `workers` Grain worker processes."""
  from configs import audioset

  config = audioset.get_config("elastic" if packed else None)
  config.data.update(train_datafile=datafile, eval_datafile="", label_csv=label_csv, num_workers=workers)
  if batch:
    config.data.batch_size = batch
  if mixup is not None and not packed:
    config.augment.mixup = mixup
  return config


def time_stream(batches: Iterable[dict[str, np.ndarray]], *, warmup: int, count: int,
                min_seconds: float) -> dict[str, float]:
  """Reads `warmup` batches, then times at least `count` batches and `min_seconds`: clips, batches, seconds,
  cpu_seconds (this process and its children)."""
  iterator = iter(batches)
  for _ in range(warmup):
    next(iterator)
  cpu_start, start = tree_cpu_seconds(), time.perf_counter()
  clips = read = 0
  while read < count or time.perf_counter() - start < min_seconds:
    clips += int(np.asarray(next(iterator)["clip_mask"]).sum())
    read += 1
  seconds, cpu = time.perf_counter() - start, tree_cpu_seconds() - cpu_start
  close = getattr(iterator, "close", None)
  if close is not None:
    close()  # stops worker processes before the next case
  return {"clips": clips, "batches": read, "seconds": seconds, "cpu_seconds": cpu}


def measure_case(config: ml_collections.ConfigDict, *, packed: bool, warmup: int, batches: int,
                 min_seconds: float, pin: bool) -> dict[str, Any]:
  """Builds the trainer's input for `config` and times its training stream (see the module docstring)."""
  workers = 0 if packed else int(config.data.num_workers)
  cores = allowed_cores()[:max(1, workers)] if pin else allowed_cores()
  load_before = os.getloadavg()
  with pinned(cores):
    inputs = build_input(config, build_sources(config), packed=packed)
    timing = time_stream(inputs.train_iterator(config.seed), warmup=warmup, count=batches, min_seconds=min_seconds)
  rate = timing["clips"] / timing["seconds"]
  return {"path": "packed" if packed else "whole_clip", "workers": workers, "cores": len(cores),
          "mixup": 0.0 if packed else float(config.augment.mixup),
          "files_per_clip": 1.0 if packed else 1.0 + float(config.augment.mixup), **timing, "clips_per_s": rate,
          "clips_per_s_per_core": rate / len(cores), "cpu_cores_used": timing["cpu_seconds"] / timing["seconds"],
          "clips_per_cpu_s": timing["clips"] / max(timing["cpu_seconds"], 1e-9),
          "load_before": list(load_before), "load_after": list(os.getloadavg())}


def measure_floor(paths: Sequence[str], config: ml_collections.ConfigDict, *, pin: bool,
                  passes: int = 3) -> list[dict[str, Any]]:
  """One thread decoding every file in turn: sf.read, load_audio and the training record (clips/s, the median of
  `passes` passes after an untimed one)."""
  import soundfile as sf

  reader = WaveformReader([Example(path, ()) for path in paths], config.audio.sample_rate)
  records = TrainRecords(reader, [(0,)] * len(paths), config.num_classes, clip_samples(config),
                         mixup=config.augment.mixup, mixup_alpha=config.augment.mixup_alpha)
  rng = np.random.default_rng(0)
  stages = {"sf.read": lambda i: sf.read(paths[i], dtype="float32"),
            "load_audio": lambda i: load_audio(paths[i], config.audio.sample_rate),
            "record": lambda i: records(i, rng)}
  times: dict[str, list[float]] = {stage: [] for stage in stages}
  with pinned(allowed_cores()[:1] if pin else allowed_cores()):
    for timed in [False] + [True] * passes:
      for stage, call in stages.items():  # interleaved, so a busy moment on the machine hits every stage alike
        start = time.perf_counter()
        for index in range(len(paths)):
          call(index)
        if timed:
          times[stage].append(time.perf_counter() - start)
  rows = []
  for stage, seconds in times.items():
    median = statistics.median(seconds)
    rows.append({"stage": stage, "clips": len(paths), "seconds": median, "clips_per_s": len(paths) / median,
                 "ms_per_clip": 1e3 * median / len(paths), "passes": passes})
  return rows


def run(folder: str, *, clips: int, seconds: float = 10.0, formats: Sequence[str] = ("flac", "wav"),
        workers: Sequence[int] = (0, 1, 2), packed: bool = True, batch: int = 0, mixup: float | None = None,
        warmup: int = 4, batches: int = 20, min_seconds: float = 5.0, pin: bool = True,
        speech_dir: str | None = None) -> dict[str, Any]:
  """Writes the clips into `folder` and measures every case: the report (see `format_table` and the module
  docstring)."""
  speech_dir = speech_dir or default_speech_dir()
  paths, audio = write_clips(folder, clips, seconds, formats, speech_dir)
  report: dict[str, Any] = {"machine": machine(), "date": datetime.datetime.now().astimezone().isoformat(
      timespec="seconds"), "command": shlex.join(sys.orig_argv), "audio": audio, "clips_per_format": clips,
      "clip_seconds": seconds, "sample_rate": SAMPLE_RATE, "load_start": list(os.getloadavg()), "formats": {},
      "cases": []}
  for fmt in formats:
    datafile, label_csv = write_datafile(folder, fmt, paths[fmt])
    report["formats"][fmt] = {"bytes_per_clip": float(np.mean([os.path.getsize(p) for p in paths[fmt]])),
                              "floor": measure_floor(paths[fmt], recipe_config(datafile, label_csv, batch=batch,
                                                                               mixup=mixup), pin=pin)}
    cases = [(count, False) for count in workers] + ([(0, True)] if packed else [])
    for count, is_packed in cases:
      config = recipe_config(datafile, label_csv, workers=count, packed=is_packed, batch=batch, mixup=mixup)
      row = {"format": fmt, **measure_case(config, packed=is_packed, warmup=warmup, batches=batches,
                                           min_seconds=min_seconds, pin=pin)}
      log.info("%s %s workers=%d: %.1f clips/s", fmt, row["path"], count, row["clips_per_s"])
      report["cases"].append(row)
  report["load_end"] = list(os.getloadavg())
  return report


def format_table(report: dict[str, Any]) -> str:
  """The report as a plain-text table: the pipeline cases, then the single-thread floors."""
  lines = [f"# {report['machine']['cpu']}, {report['machine']['cores']} cores; {report['date']}",
           f"# {report['command']}",
           f"# {report['clips_per_format']} clips/format of {report['clip_seconds']:g} s, {report['audio']}",
           (f"# load averages (1, 5, 15 min): {_loads(report['load_start'])} at the start, "
            f"{_loads(report['load_end'])} at the end"),
           "format  path        workers  cores  mixup  clips  clips/s  per_core  cpu   clips/cpu_s  load before->after"]
  for row in report["cases"]:
    lines.append(f"{row['format']:<7} {row['path']:<11} {row['workers']:>7}  {row['cores']:>5}  {row['mixup']:>5.2f}"
                 f"  {row['clips']:>5}  {row['clips_per_s']:>7.1f}  {row['clips_per_s_per_core']:>8.1f}"
                 f"  {row['cpu_cores_used']:>4.2f}  {row['clips_per_cpu_s']:>11.1f}"
                 f"  {row['load_before'][0]:.2f}->{row['load_after'][0]:.2f}")
  lines.append("format  stage (one thread)  clips  ms/clip  clips/s  bytes/clip")
  for fmt, entry in report["formats"].items():
    for row in entry["floor"]:
      lines.append(f"{fmt:<7} {row['stage']:<18} {row['clips']:>6}  {row['ms_per_clip']:>7.3f}"
                   f"  {row['clips_per_s']:>7.1f}  {entry['bytes_per_clip']:>10.0f}")
  return "\n".join(lines)


def _loads(loads: Sequence[float]) -> str:
  return " ".join(f"{load:.2f}" for load in loads)


# ----------------------------------------------------------------------------------------------- the machine


def machine() -> dict[str, Any]:
  """CPU model, core counts and library versions."""
  import grain
  import soundfile as sf

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
      cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "cores_allowed": len(allowed_cores()), "platform": platform.platform(),
          "python": platform.python_version(), "numpy": np.__version__,
          "grain": getattr(grain, "__version__", "unknown"), "soundfile": sf.__version__,
          "libsndfile": sf.__libsndfile_version__, "malloc": "tcmalloc" if "tcmalloc" in os.environ.get(
              "LD_PRELOAD", "") else "system"}


def allowed_cores() -> list[int]:
  return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@contextlib.contextmanager
def pinned(cores: Sequence[int]) -> Iterator[None]:
  """Restricts every thread of this process (and so the threads and processes it starts) to `cores`."""
  if not hasattr(os, "sched_setaffinity"):
    yield
    return
  saved = set(os.sched_getaffinity(0))
  _set_thread_affinity(set(cores))
  try:
    yield
  finally:
    _set_thread_affinity(saved)


def _set_thread_affinity(cores: set[int]) -> None:
  """The affinity call acts on one thread; JAX's and Grain's threads already running get it one by one."""
  for thread in os.listdir(f"/proc/{os.getpid()}/task"):
    try:
      os.sched_setaffinity(int(thread), cores)
    except OSError:
      pass  # a thread that ended meanwhile


def tree_cpu_seconds(pid: int | None = None) -> float:
  """User + system CPU seconds of process `pid` (default this one) and its living descendants (Linux /proc;
  elsewhere this process alone)."""
  pid = pid or os.getpid()
  if not os.path.isdir(f"/proc/{pid}"):
    return time.process_time() if pid == os.getpid() else 0.0
  ticks = os.sysconf("SC_CLK_TCK")
  total = 0.0
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
      fields = handle.read().rsplit(")", 1)[1].split()
    total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    children = set()
    for thread in os.listdir(f"/proc/{pid}/task"):
      with open(f"/proc/{pid}/task/{thread}/children", encoding="utf-8") as handle:
        children.update(int(child) for child in handle.read().split())
  except (OSError, IndexError, ValueError):
    return total  # the process ended meanwhile
  return total + sum(tree_cpu_seconds(child) for child in children)


def default_speech_dir() -> str:
  from configs.common import SHARED_DATA

  return os.path.normpath(os.path.join(SHARED_DATA, "fsdd", "recordings"))


# ----------------------------------------------------------------------------------------------- command line

def define_flags() -> None:
  """The command line's flags. Defined when the module runs as a command, not on import: other command-line
  modules use some of the same names (`batches`, `json`), and tests import this one beside them."""
  global _CLIPS, _SECONDS, _FORMATS, _WORKERS, _PACKED, _BATCH, _MIXUP, _WARMUP, _BATCHES, _MIN_SECONDS, _PIN, _DIR
  global _SPEECH, _JSON
  _CLIPS = flags.DEFINE_integer("clips", 240, "Clips written per format.", lower_bound=1)
  _SECONDS = flags.DEFINE_float("seconds", 10.0, "Length of each clip in seconds (AudioSet: 10).")
  _FORMATS = flags.DEFINE_list("formats", ["flac", "wav"], "File formats (soundfile names, lower case).")
  _WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Grain worker process counts (config.data.num_workers).")
  _PACKED = flags.DEFINE_bool("packed", True, "Also time ElasticAST's packed rows (workers=0).")
  _BATCH = flags.DEFINE_integer("batch", 0, "Clips per batch (0: the recipe's, 12).", lower_bound=0)
  _MIXUP = flags.DEFINE_float("mixup", None, "Waveform mixup probability (default: the recipe's, 0.5).")
  _WARMUP = flags.DEFINE_integer("warmup_batches", 4, "Untimed batches first (worker start-up).", lower_bound=0)
  _BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches at least.", lower_bound=1)
  _MIN_SECONDS = flags.DEFINE_float("min_seconds", 5.0, "Timed seconds at least per case.")
  _PIN = flags.DEFINE_bool("pin", True, "Pin each case to max(1, workers) cores.")
  _DIR = flags.DEFINE_string("dir", None, "Folder for the clips (kept); default a temporary folder, removed.")
  _SPEECH = flags.DEFINE_string("speech_dir", None, "FSDD recordings (default: shared/data/fsdd/recordings).")
  _JSON = flags.DEFINE_string("json", None, "Also write the report as JSON here.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  log.setLevel(logging.INFO)
  try:
    workers = [int(value) for value in _WORKERS.value]
  except ValueError as error:
    raise app.UsageError(f"--workers takes integers: {error}") from error
  options = dict(clips=_CLIPS.value, seconds=_SECONDS.value, formats=[f.lower() for f in _FORMATS.value],
                 workers=workers, packed=_PACKED.value, batch=_BATCH.value, mixup=_MIXUP.value,
                 warmup=_WARMUP.value, batches=_BATCHES.value, min_seconds=_MIN_SECONDS.value, pin=_PIN.value,
                 speech_dir=_SPEECH.value)
  if _DIR.value:
    os.makedirs(_DIR.value, exist_ok=True)
    report = run(_DIR.value, **options)
  else:
    with tempfile.TemporaryDirectory(prefix="ast_jax_decode_") as folder:
      report = run(folder, **options)
  print(format_table(report))
  if _JSON.value:
    os.makedirs(os.path.dirname(_JSON.value) or ".", exist_ok=True)
    with open(_JSON.value, "w", encoding="utf-8") as handle:
      json.dump(report, handle, indent=1)


if __name__ == "__main__":
  from ast_jax import runtime

  runtime.restart_with_tcmalloc()  # as the trainer runs: its input pipeline shares the process's allocator
  define_flags()
  app.run(main)
