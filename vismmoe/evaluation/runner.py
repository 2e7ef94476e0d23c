"""`run_eval`: run an engine over a benchmark, per sweep setting, resumable and data-parallel.

Layout of an output directory (one per setting; with --sweep, one sub-directory per setting plus a sweep
table and plot at the top):
  run.json                          what was evaluated; a re-run must match it to resume
  samples.rank<R>.partial.jsonl     records appended as they are produced (survive a crash)
  samples.jsonl, results.json, summary.md, skipped.jsonl   written when the setting finishes
Re-running into the same directory skips the questions whose records already exist.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from . import sweep as sweeps
from .distributed import Processes
from .errors import BadRecords, EvalDataError
from .outputs import STAT_KEYS, ordered, provenance, read_jsonl, write_atomic, write_jsonl, write_results
from .scoring import base_record, build_results, check_mode, prepare_samples
from .tasks import Task, get_task


def run_eval(model, task: str, data=None, *, limit: int | None = None, config=None, sweep=None,
             output=None, split: str | None = None, normalize: str = "official",
             prompt_template: str | None = None, max_new_tokens: int | None = None, skip_bad: bool = False,
             overrides: dict | None = None, engine_factory: Callable | None = None, progress: bool = True) -> dict:
    """Evaluate `model` on `task`; returns results.json's content (with --sweep: the sweep table).

    engine_factory(model, config=config, **overrides) builds an engine; the default is `vismmoe.load`.
    `sweep` is a list like ["budget=0.25,0.5", "visual_keep=1.0,0.5"] or a dict {key: [values]}.
    """
    check_mode(normalize)
    spec = get_task(task)
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)
                                       or max_new_tokens < 1):
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    grid = sweeps.parse_sweep(sweep)
    out_root = Path(output) if output is not None else Path("runs/eval") / Path(str(model)).name / spec.name
    procs = Processes.from_env()
    run = _Run(model=model, spec=spec, data=data, config=config, normalize=normalize,
               prompt_template=prompt_template,
               max_new_tokens=spec.max_new_tokens if max_new_tokens is None else max_new_tokens,
               skip_bad=skip_bad, overrides=dict(overrides or {}), factory=engine_factory or _default_factory,
               progress=progress, procs=procs)
    bad = BadRecords(skip_bad)
    loaded = prepare_samples(spec, data, split, limit, prompt_template, bad)
    try:
        rows = []
        for setting in sweeps.settings(grid):
            out_dir = out_root / sweeps.setting_name(setting) if grid else out_root
            results = run.setting(setting, loaded, bad, out_dir)
            rows.append(_sweep_row(setting, results, spec.headline))
        if not grid:
            return results
        table = {"task": spec.name, "model": str(model), "headline": spec.headline, "rows": rows,
                 "provenance": provenance(_device(procs))}
        if procs.is_main:
            write_atomic(out_root / "results.json", json.dumps(table, indent=2, default=str) + "\n")
            write_atomic(out_root / "summary.md", _sweep_markdown(table))
            sweeps.plot(rows, spec.headline, out_root / "accuracy_vs_latency.png")
        return table
    finally:
        run.close()


def _default_factory(model, config=None, **overrides):
    import vismmoe

    return vismmoe.load(model, config=config, **overrides)


@dataclass
class _Run:
    """One evaluation across sweep settings; holds the engine so it can be reconfigured between them."""

    model: object
    spec: Task
    data: object
    config: object
    normalize: str
    prompt_template: str | None
    max_new_tokens: int
    skip_bad: bool
    overrides: dict
    factory: Callable
    progress: bool
    procs: Processes
    engine: object = None

    def setting(self, setting: dict, loaded, bad: BadRecords, out_dir: Path) -> dict:
        procs = self.procs
        overrides = {**self.overrides, **setting}
        if procs.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._check_resume(out_dir, overrides, loaded.split)
        procs.barrier()
        done = _done_ids(out_dir)
        procs.barrier()  # every process has read the done set before any process appends to it
        pending = [s for s in loaded.samples if str(s.question_id) not in done]
        mine = pending[procs.rank::procs.world_size]
        if mine:
            self._engine_for(setting, overrides, out_dir)
            self._warm_up(mine[0])
        procs.barrier()  # every engine is loaded: the timed evaluation starts together on every process
        start = time.perf_counter()
        if mine:
            try:
                self._evaluate(mine, out_dir / f"samples.rank{procs.rank}.partial.jsonl", _label(setting))
            except KeyboardInterrupt:
                raise Interrupted(len(_done_ids(out_dir)), len(loaded.samples)) from None
        procs.barrier()
        wall = time.perf_counter() - start
        if procs.is_main:
            throughput = {"evaluated": len(pending), "processes": procs.world_size, "wall_s": round(wall, 3),
                          "samples_per_s": round(len(pending) / wall, 3) if pending and wall > 0 else None}
            self._finish(loaded, bad, out_dir, overrides, throughput)
        procs.barrier()
        return json.loads((out_dir / "results.json").read_text())

    def _check_resume(self, out_dir: Path, overrides: dict, split: str) -> None:
        identity = json.loads(json.dumps({
            "task": self.spec.name, "model": str(self.model),
            "data": str(Path(self.data).resolve()) if self.data is not None else None, "split": split,
            "config": self.config if isinstance(self.config, dict) or self.config is None else str(self.config),
            "overrides": overrides, "prompt_template": self.prompt_template or self.spec.prompt_template,
            "max_new_tokens": self.max_new_tokens,
        }, default=str))
        manifest = out_dir / "run.json"
        if manifest.is_file():
            previous = json.loads(manifest.read_text())
            changed = [k for k in identity if previous.get(k) != identity[k]]
            if changed:
                raise ConfigError(
                    f"{out_dir} holds a run with different {', '.join(changed)} "
                    f"({', '.join(f'{k}: {previous.get(k)!r} -> {identity[k]!r}' for k in changed)}); "
                    "use another --output directory or delete this one")
        else:
            write_atomic(manifest, json.dumps(identity, indent=2) + "\n")

    def _engine_for(self, setting: dict, overrides: dict, out_dir: Path) -> None:
        if self.engine is not None and hasattr(self.engine, "reconfigure"):
            try:
                self.engine.reconfigure(**setting)
            except ConfigError:  # a setting that needs a reload (device, dtype...): load afresh below
                self.close()
        else:
            self.close()  # free the previous setting's engine before loading the next one
        if self.engine is None:
            overrides = dict(overrides)
            if _on_cpu_rank(self.procs):
                import torch

                # A GPU machine's spare cores: one single-threaded CPU engine per extra rank.
                torch.set_num_threads(1)
                overrides["device"] = "cpu"
            elif self.procs.world_size > 1 and _cuda_available():
                import torch

                # Ranks beyond the GPU count share GPUs round-robin: a small model leaves one process
                # CPU-bound, so several per GPU raise throughput. Nothing of this process lands on cuda:0.
                index = self.procs.local_rank % torch.cuda.device_count()
                torch.cuda.set_device(index)
                overrides.setdefault("device", f"cuda:{index}")
            self.engine = self.factory(self.model, config=self.config, **overrides)
        config = getattr(self.engine, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            recorded = config.to_dict()
            # What ran, not what was asked for: "auto" resolved, and the generation length of this run.
            for key in ("device", "dtype"):
                if getattr(self.engine, key, None) is not None:
                    recorded[key] = str(getattr(self.engine, key)).removeprefix("torch.")
            recorded["max_new_tokens"] = self.max_new_tokens
            write_atomic(out_dir / "engine_config.json", json.dumps(recorded, indent=2, default=str) + "\n")

    def _warm_up(self, sample) -> None:
        """One unrecorded request first (engines that offer `warm_up`): JIT compilation (numba, Triton)
        and CUDA graph capture would otherwise land in the first sample's latency and in the throughput."""
        warm_up = getattr(self.engine, "warm_up", None)
        if warm_up is None:
            return
        try:
            image = sample.image.load() if sample.image is not None else None
        except EvalDataError:
            return  # the timed loop reports (or skips) the bad sample
        warm_up(image=image, prompt=sample.prompt, max_new_tokens=self.max_new_tokens)

    def _evaluate(self, samples: list, partial: Path, label: str) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(samples, desc=f"{self.spec.name} {label}".strip(), dynamic_ncols=True,
                   disable=not self.progress or not self.procs.is_main)
        total = 0.0
        with open(partial, "a") as out:
            for count, sample in enumerate(bar, 1):
                try:
                    image = sample.image.load() if sample.image is not None else None
                except EvalDataError as error:
                    if not self.skip_bad:
                        raise
                    out.write(json.dumps({"question_id": sample.question_id, "skipped": str(error)}) + "\n")
                    continue
                start = time.perf_counter()
                result = self.engine.generate(image=image, prompt=sample.prompt, max_new_tokens=self.max_new_tokens)
                latency = time.perf_counter() - start
                record = {**base_record(sample), "prediction": result.text, "latency_s": latency,
                          **_stats(result)}
                if gpu_ranks() is not None:  # a mixed GPU + CPU run: say where each answer came from
                    record["device"] = str(getattr(self.engine, "device", "unknown"))
                record.update(self.spec.score(record, self.normalize))
                out.write(json.dumps(ordered(record), default=str) + "\n")
                out.flush()
                total += record["score"]
                bar.set_postfix(acc=f"{total / count:.3f}")

    def _finish(self, loaded, bad: BadRecords, out_dir: Path, overrides: dict, throughput: dict) -> None:
        partials = sorted(out_dir.glob("samples.rank*.partial.jsonl"))
        by_id, skipped = {}, {}
        for record in read_jsonl(out_dir / "samples.jsonl") + [r for p in partials for r in read_jsonl(p)]:
            if "skipped" in record:
                skipped[str(record["question_id"])] = record
            else:
                by_id[str(record["question_id"])] = record
        records = []
        for sample in loaded.samples:
            record = by_id.get(str(sample.question_id))
            if record is not None:
                record.update(self.spec.score(record, self.normalize))  # re-scored: --normalize may change
                records.append(record)
        run_skipped = [r for k, r in skipped.items() if k not in by_id]
        engine_config = out_dir / "engine_config.json"
        results = build_results(
            self.spec, loaded, records, data=self.data, normalize=self.normalize,
            prompt_template=self.prompt_template, max_new_tokens=self.max_new_tokens,
            skipped={"count": len(bad.errors) + len(run_skipped),
                     "examples": (bad.errors + [r["skipped"] for r in run_skipped])[:20]},
            device=_device(self.procs), model=str(self.model), overrides=overrides,
            config_file=self.config if isinstance(self.config, (dict, type(None))) else str(self.config),
            config=json.loads(engine_config.read_text()) if engine_config.is_file() else None,
            world_size=self.procs.world_size,
            # This invocation's evaluation loop (engine loading excluded; a resumed run counts only the
            # samples it evaluated), for data-parallel scaling.
            throughput=throughput,
        )
        write_results(out_dir, results, records)
        if run_skipped:
            write_jsonl(out_dir / "skipped.jsonl", run_skipped)
        for p in partials:
            p.unlink()

    def close(self) -> None:
        if self.engine is not None:
            if hasattr(self.engine, "close"):
                self.engine.close()
            self.engine = None
            gc.collect()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during an evaluation: `saved` of `total` questions have records on disk (a re-run resumes)."""

    def __init__(self, saved: int, total: int):
        super().__init__(f"{saved}/{total} saved")
        self.saved, self.total = saved, total


def _done_ids(out_dir: Path) -> set[str]:
    files = [out_dir / "samples.jsonl", *out_dir.glob("samples.rank*.partial.jsonl")]
    return {str(r["question_id"]) for f in files for r in read_jsonl(f) if "skipped" not in r}


def _stats(result) -> dict:
    stats = getattr(result, "stats", None)
    if stats is None:
        return {}
    data = stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)
    lifted = {k: data.get(k) for k in STAT_KEYS}
    return {**lifted, "stats": {k: v for k, v in data.items() if k not in lifted}}


def _label(setting: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items())


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def gpu_ranks() -> int | None:
    """VISMMOE_EVAL_GPU_RANKS=N: local ranks N and above evaluate on the CPU (unset: every rank on the GPUs).

    Small models leave a GPU process CPU-bound and several processes time-share one GPU, so on a GPU
    machine with many cores extra CPU ranks add throughput (accuracy runs; their latencies are the CPU's)."""
    value = os.environ.get("VISMMOE_EVAL_GPU_RANKS")
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise ConfigError(f"VISMMOE_EVAL_GPU_RANKS must be a whole number of ranks, got {value!r}")
    return int(value)


def _on_cpu_rank(procs: Processes) -> bool:
    limit = gpu_ranks()
    return limit is not None and procs.local_rank >= limit


def _device(procs: Processes) -> str:
    if _cuda_available():
        import torch

        limit = gpu_ranks()
        name = torch.cuda.get_device_name(0)
        if limit is not None and limit < procs.world_size:
            return f"{limit} x {name} + {procs.world_size - limit} x cpu (one thread each)"
        return f"{procs.world_size} x {name}"
    import platform

    return f"{procs.world_size} x cpu ({platform.processor() or platform.machine()})"


def _sweep_row(setting: dict, results: dict, headline: str) -> dict:
    eff = results.get("efficiency") or {}
    return {"setting": _label(setting) or "default", **setting, headline: results["metrics"].get(headline),
            **{k: eff.get(k) for k in ("latency_s_mean", "ttft_s_mean", "decode_tokens_per_s",
                                       "expert_hit_rate", "peak_gpu_bytes_max", "visual_tokens_kept_mean")},
            "n_samples": results["n_samples"]}


def _sweep_markdown(table: dict) -> str:
    headline = table["headline"]
    columns = ["setting", headline, "latency_s_mean", "ttft_s_mean", "decode_tokens_per_s", "expert_hit_rate",
               "peak_gpu_bytes_max", "visual_tokens_kept_mean", "n_samples"]

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = [f"# {table['task']} sweep, model `{table['model']}`", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in table["rows"]]
    return "\n".join(lines) + "\n\n![accuracy vs latency](accuracy_vs_latency.png)\n"
