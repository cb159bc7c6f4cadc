"""The paper's accuracy study in one command: every variant of a family trained with several
seeds as ordinary runs, then compared with orig by a significance test.

    report = run_study("nin", data="fashion-mnist", seeds=3, variants=["root", "tree", "col"],
                       epochs=10, out="studies/nin-fashion-mnist")
    print(report.markdown())

Each (variant, seed) is a training run in ``OUT/runs/MODEL-seedN``: a finished run is
skipped, an interrupted one resumed, so the study itself resumes when its command is run
again. ``OUT/manifest.json`` says what the study is (family, data, epochs, settings); the
report (``study.md``, ``study.csv``, ``study.json``, ``accuracy.png``) is rebuilt from the
runs' ``summary.json`` files alone (:func:`study_report`).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import DeeprootsError
from ..checks import check_positive
from ..config import TrainConfig, config_defaults, setting_differences
from ..reproduction.tables import PAPER_TABLES
from ..plots import plot_accuracy_vs_cost
from ..models.registry import is_model, list_models, model_entry, model_name
from ..runtime import check_output_dir, write_json, write_text
from ..text import format_table
from .folder import RunFolder, lock_holder, read_summary
from .run import study_run_folder
from .loop import train

__all__ = ["run_study", "study_report", "StudyReport", "VariantStats", "welch",
           "study_variants", "STUDY_SETTINGS"]

TOPOLOGIES = ("root", "tree", "col")
# TrainConfig settings a study fixes itself
STUDY_SETTINGS = ("model", "out", "seed", "resume", "overwrite", "change", "progress")
DEFAULT_DATA, DEFAULT_EPOCHS = "fashion-mnist", 10  # a new study's, where not given
# where the paper reports each family's accuracy: (dataset, column)
PAPER_ACCURACY = {"nin": ("cifar10", "Accuracy"), "resnet50": ("imagefolder", "Top-1 Acc."),
                  "googlenet": ("imagefolder", "Top-1 Acc.")}


def study_variants(family: str, variants: Optional[Sequence[str]] = None) -> List[str]:
    """The model names of a study: orig and every registered variant of ``family``, or those
    of the topologies named (``root``, ``tree``, ``col``), or the names given (orig is always
    added, as the baseline)."""
    if not is_model(family) or model_entry(family).variant != "orig":
        families = [n for n in list_models() if model_entry(n).variant == "orig"]
        raise DeeprootsError(f"unknown model family {family!r}; accepted: {', '.join(families)}")
    members = [n for n in list_models(f"{family}*")
               if n == family or model_entry(n).name.startswith(family + "-")]
    if not variants:
        return members
    chosen = [family]
    for v in variants:
        if v in TOPOLOGIES:
            picked = [n for n in members if model_entry(n).topology == v]
            if not picked:
                kinds = sorted({model_entry(n).topology for n in members})
                raise DeeprootsError(f"{family} has no {v} variants; it has {', '.join(kinds)}")
            chosen += picked
        else:
            name = v if v in members else model_name(family, v)
            if name not in members:
                raise DeeprootsError(f"unknown variant {v!r} of {family}; accepted: root, tree, "
                                     f"col or names from {', '.join(members)}")
            chosen.append(name)
    return list(dict.fromkeys(chosen))


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[Tuple[float, float, float, float]]:
    """Welch's t-test of mean(a) - mean(b): ``(difference, 95% CI low, high, two-sided p)``,
    or None with fewer than 2 values on either side."""
    from scipy import stats  # scipy: only for the study's statistics

    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    diff, se = ma - mb, math.sqrt(va + vb)
    if se == 0:  # every seed gave the same accuracy on both sides
        return diff, diff, diff, 1.0 if diff == 0 else 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    p = 2 * stats.t.sf(abs(diff / se), df)
    q = stats.t.ppf(0.975, df)
    return diff, diff - q * se, diff + q * se, float(p)


@dataclass
class VariantStats:
    """One variant over its seeds: test top-1 and top-5 (mean and sample standard deviation),
    costs at the data's input size and as a fraction of orig, training images/s, the paper's
    accuracy where it reports this dataset, and the comparison with orig (difference of
    means with its 95% confidence interval and Welch's p-value, in top-1 fractions)."""

    model: str
    topology: str
    n: int
    seeds: List[int]
    top1_mean: float
    top1_std: float
    top5_mean: float
    top5_std: float
    macs: int
    params: int
    macs_fraction: float
    params_fraction: float
    images_per_s: float
    paper_top1: Optional[str] = None
    diff: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    p_value: Optional[float] = None
    verdict: str = ""
    pareto: bool = False


@dataclass
class StudyReport:
    """A study's table: one :class:`VariantStats` per variant, and what did not run."""

    family: str
    data: str
    epochs: int
    variants: List[VariantStats] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # runs not finished
    seeds: int = 0  # the seeds every variant is run with (the manifest's)
    corrupt: List[str] = field(default_factory=list)  # summaries that could not be read
    foreign: List[str] = field(default_factory=list)  # folders holding another run
    held: List[str] = field(default_factory=list)  # runs another process was training
    wall_s: float = 0.0
    out: str = ""  # the study's folder, where the report files are

    def to_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> List[tuple]:
        def pm(m, s):
            return f"{m:.4f} ± {s:.4f}"

        out = []
        for v in self.variants:
            ci = (f"{100 * v.diff:+.2f} [{100 * v.ci_low:+.2f}, {100 * v.ci_high:+.2f}]"
                  if v.diff is not None else "")
            out.append((v.model, str(v.n), pm(v.top1_mean, v.top1_std),
                        pm(v.top5_mean, v.top5_std), f"{v.macs / 1e6:.1f}",
                        f"{100 * v.macs_fraction:.0f}%", f"{v.params / 1e3:.0f}k",
                        f"{100 * v.params_fraction:.0f}%", f"{v.images_per_s:.0f}",
                        v.paper_top1 or "", ci,
                        "" if v.p_value is None else f"{v.p_value:.3f}", v.verdict,
                        "yes" if v.pareto else ""))
        return out

    HEAD = ("model", "seeds", "top-1", "top-5", "MMACs", "of orig", "params", "of orig",
            "img/s", "paper top-1", "diff vs orig, points [95% CI]", "p (Welch)", "verdict",
            "Pareto")

    def table(self) -> str:
        return format_table(self.HEAD, self.rows(), align="lrllrrrrrrlrll")

    def markdown(self) -> str:
        lines = [f"# {self.family} on {self.data}: {self.epochs} epochs per run", "",
                 "Test top-1 and top-5: mean ± sample standard deviation over seeds. Costs at "
                 "the data's input size. diff: variant minus orig in accuracy points, with its "
                 "95% confidence interval and Welch's t-test p-value; 'within noise' means "
                 "p >= 0.05. Pareto: no other variant has both fewer multiply-adds and higher "
                 "mean top-1.", "",
                 "| " + " | ".join(self.HEAD) + " |", "|" + "---|" * len(self.HEAD)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows()]
        if self.missing:
            lines += ["", f"Not finished: {', '.join(self.missing)}."]
        if self.foreign:
            lines += ["", "Not this study's runs, left out (move them away to run the "
                          "study's own): " + "; ".join(self.foreign) + "."]
        if self.corrupt:
            lines += ["", f"Unreadable summaries (re-run, not averaged in): "
                          f"{', '.join(self.corrupt)}."]
        lines += ["", "![accuracy against costs](accuracy.png)", ""]
        return "\n".join(lines)

    def csv(self) -> str:
        buf = io.StringIO()
        names = [f.name for f in fields(VariantStats)]
        writer = csv.DictWriter(buf, fieldnames=names)
        writer.writeheader()
        for v in self.variants:
            writer.writerow({**asdict(v), "seeds": " ".join(map(str, v.seeds))})
        return buf.getvalue()


class _Foreign(DeeprootsError):
    """A run folder of the study that holds another run (another model, seed or data)."""


def _read_summary(path: Path, epochs: int, model: Optional[str] = None,
                  seed: Optional[int] = None, data: Optional[str] = None) -> Optional[dict]:
    """A finished run's summary, None if the run has not finished; a DeeprootsError if it
    cannot be read (:func:`deeproots.training.folder.read_summary`), :class:`_Foreign` if it is the
    run of another model, seed or data than the study's folder name says (never averaged
    in as this one)."""
    if not path.exists():
        return None
    summary = read_summary(path)
    if model is not None:
        config = summary["config"]
        held = (summary["model"], config.get("seed"), summary.get("data"))
        wanted = (model, seed, data)
        if any(w is not None and h != w for h, w in zip(held[:2], wanted[:2])) or (
                data is not None and config.get("data", data) != data):
            raise _Foreign(f"{path.parent.name} holds a run of {held[0]} with seed "
                           f"{held[1]} on {config.get('data')}, not this study's {model} "
                           f"seed {seed} on {data}")
    return summary if summary.get("epochs") == epochs else None


def _pareto(stats: List[VariantStats]) -> None:
    for v in stats:
        v.pareto = not any(
            (o.macs <= v.macs and o.top1_mean >= v.top1_mean)
            and (o.macs < v.macs or o.top1_mean > v.top1_mean) for o in stats if o is not v)


def _verdict(test) -> str:
    if test is None:
        return "needs 2+ seeds of both to compare"
    diff, _, _, p = test
    if p >= 0.05:
        return "within noise of orig"
    return f"{'better' if diff > 0 else 'worse'} by {100 * abs(diff):.2f} points"


def study_report(out: Path | str) -> StudyReport:
    """The study in ``out`` from its manifest and its runs' summaries alone; writes
    ``study.md``, ``study.csv``, ``study.json`` and ``accuracy.png`` there."""
    out = Path(out)
    manifest = _manifest(out)
    family, data, epochs = manifest["family"], manifest["data"], manifest["epochs"]
    report = StudyReport(family, data, epochs, wall_s=manifest.get("wall_s", 0.0), out=str(out),
                         seeds=len(manifest["seeds"]))
    runs: Dict[str, List[dict]] = {}
    for model in manifest["models"]:
        for seed in manifest["seeds"]:
            folder = study_run_folder(out, model, seed)
            try:
                summary = _read_summary(folder / "summary.json", epochs, model, seed, data)
            except _Foreign as err:
                report.foreign.append(str(err))
                continue
            except ValueError:
                report.corrupt.append(folder.name)
                continue
            if summary is None:
                report.missing.append(folder.name)
            else:
                runs.setdefault(model, []).append({**summary, "seed": seed})
    if family not in runs:
        raise DeeprootsError(f"the study in {out} has no finished run of {family} (orig) yet; "
                             f"run it first (the comparison needs orig)")
    base = runs[family]
    paper_data, column = PAPER_ACCURACY.get(family, (None, None))
    table = next((t for t in PAPER_TABLES.values() if t.model == family), None)
    show_paper = table is not None and paper_data and data.startswith(paper_data)
    for model, items in runs.items():
        top1 = [r["top1"] for r in items]
        top5 = [r["top5"] for r in items]
        entry = model_entry(model)
        test = welch(top1, [r["top1"] for r in base]) if model != family else None
        report.variants.append(VariantStats(
            model=model, topology=entry.topology, n=len(items),
            seeds=[r["seed"] for r in items], top1_mean=_mean(top1), top1_std=_std(top1),
            top5_mean=_mean(top5), top5_std=_std(top5), macs=items[0]["macs"],
            params=items[0]["params"], macs_fraction=items[0]["macs"] / base[0]["macs"],
            params_fraction=items[0]["params"] / base[0]["params"],
            images_per_s=_mean([r["train_images_per_s"] for r in items]),
            paper_top1=(table.rows[entry.variant][table.columns.index(column)]
                        if show_paper and entry.variant in table.rows else None),
            diff=test[0] if test else None, ci_low=test[1] if test else None,
            ci_high=test[2] if test else None, p_value=test[3] if test else None,
            verdict="baseline" if model == family else _verdict(test)))
    _pareto(report.variants)
    write_text(out / "study.md", report.markdown())
    write_text(out / "study.csv", report.csv())
    write_json(out / "study.json", report.to_dict())
    plot_accuracy_vs_cost(
        {v.model: {"macs": v.macs, "params": v.params, "mean": v.top1_mean, "std": v.top1_std,
                   "n": v.n, "topology": v.topology} for v in report.variants},
        out / "accuracy.png", f"{family} on {data}: test top-1 against costs ({epochs} epochs,"
        f" mean and std over seeds)", frontier=[v.model for v in report.variants if v.pareto])
    return report


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _manifest(out: Path) -> dict:
    """The study's manifest, checked to be one deeproots wrote: a one-line error for a
    missing, unreadable or foreign one (another tool's JSON, a list, ``{}``)."""
    path = out / "manifest.json"
    if not path.exists():
        raise DeeprootsError(f"{out} holds no study (no manifest.json); run deeproots study "
                             f"there first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DeeprootsError(f"{path} is not readable ({err})") from None
    expected = ("family (a model family), data, epochs (a whole number >= 1), models and "
                "seeds (lists)")
    if not isinstance(manifest, dict):
        raise DeeprootsError(f"{path} is not a deeproots study manifest (a JSON "
                             f"{type(manifest).__name__}, not an object with {expected})")
    problems = [k for k in ("family", "data", "epochs", "models", "seeds") if k not in manifest]
    if not problems:
        problems = [k for k, ok in (
            ("family", isinstance(manifest["family"], str) and is_model(manifest["family"])),
            ("data", isinstance(manifest["data"], str)),
            ("epochs", isinstance(manifest["epochs"], int) and not isinstance(
                manifest["epochs"], bool) and manifest["epochs"] >= 1),
            ("models", isinstance(manifest["models"], list) and all(
                isinstance(m, str) and is_model(m) for m in manifest["models"])),
            ("seeds", isinstance(manifest["seeds"], list) and all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0
                for s in manifest["seeds"])),
            ("settings", isinstance(manifest.get("settings", {}), dict))) if not ok]
    if problems:
        raise DeeprootsError(f"{path} is not a deeproots study manifest ({', '.join(problems)} "
                             f"missing or wrong; it holds {expected})")
    return manifest


def run_study(family: str, *, data: Optional[str] = None, seeds: int = 3,
              variants: Optional[Sequence[str]] = None, epochs: Optional[int] = None,
              out: Optional[Path | str] = None, progress: Optional[bool] = None,
              **train_settings) -> StudyReport:
    """Train every (variant, seed) of the study as an ordinary run in ``out``, skipping
    finished runs and resuming interrupted ones, then write and return the report.
    ``train_settings`` are further :class:`TrainConfig` fields (``lr``, ``batch_size``,
    ``device``, ``data_dir``, ...), the same for every run. A study ``out`` holds already
    is continued with its own settings (``data``, ``epochs`` and the rest) and its own
    variants wherever they are not given; a new one takes every variant, Fashion-MNIST and
    10 epochs where they are not."""
    check_positive("seeds", seeds)
    models = study_variants(family, variants) if variants is not None else None
    fixed = [k for k in train_settings if k in STUDY_SETTINGS]
    known = {f.name for f in fields(TrainConfig)}
    unknown = [k for k in train_settings if k not in known]
    if fixed or unknown:
        raise DeeprootsError(f"a study sets {', '.join(fixed or unknown)} itself"
                             if fixed else f"unknown training settings: {', '.join(unknown)}")
    name = f"{family}-{(data or DEFAULT_DATA).split(':')[0]}"
    out = Path(out) if out else Path("studies") / name
    check_output_dir(out)
    saved = _manifest(out) if (out / "manifest.json").exists() else None
    if saved is not None:  # a study to continue: its own settings by default
        train_settings = {**{k: v for k, v in saved.get("settings", {}).items()
                             if k not in ("data", "epochs")}, **train_settings}
        data = saved["data"] if data is None else data
        epochs = saved["epochs"] if epochs is None else epochs
        if models is None and saved["family"] == family:  # its own variants, none added
            models = list(saved["models"])
    models = study_variants(family, None) if models is None else models
    data = DEFAULT_DATA if data is None else data
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    check_positive("epochs", epochs)
    if isinstance(train_settings.get("data_dir"), str):  # a study continued from elsewhere
        train_settings["data_dir"] = os.path.abspath(train_settings["data_dir"])
    settings = {"epochs": epochs, "data": data, **train_settings}
    TrainConfig(model=family, **settings).check()  # every setting, before anything runs
    manifest = _claim(out, saved, family, data, epochs, models, list(range(seeds)), settings)
    # seed-major: a study cut short still has every variant, with fewer seeds
    todo = [(m, s) for s in range(seeds) for m in models]
    done = sum(_finished(out, m, s, epochs, data) for m, s in todo)
    show = progress if progress is not None else sys.stderr.isatty()
    bar = None
    if show:
        from tqdm import tqdm  # only on a terminal

        bar = tqdm(total=len(todo), initial=done, desc=f"study {family}", unit="run")
    started = time.perf_counter()
    held: List[str] = []
    try:
        for model, seed in todo:
            if _finished(out, model, seed, epochs, data):
                continue
            if bar is not None:
                bar.set_postfix_str(f"{model} seed {seed}")
            folder = study_run_folder(out, model, seed)
            pid = lock_holder(folder)
            if pid is not None:  # another study trains it now: never touched from here
                held.append(f"{folder.name} (process {pid})")
                print(f"deeproots study: {folder.name} is being trained by process {pid}; "
                      f"skipped here (run the study again once it ends to report it)",
                      file=sys.stderr)
                continue
            _train_one(folder, model, seed, settings)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        manifest["wall_s"] = manifest.get("wall_s", 0.0) + time.perf_counter() - started
        write_json(out / "manifest.json", manifest)
    report = study_report(out)
    report.held = held
    return report


def _claim(out: Path, manifest: Optional[dict], family, data, epochs, models, seeds,
           settings) -> dict:
    """The study's manifest: written for a new study; for an existing one (``manifest``, as
    read), checked to be the same study (family, data, epochs), with new variants or seeds
    added."""
    path = out / "manifest.json"
    if manifest is not None:
        for key, value in (("family", family), ("data", data), ("epochs", epochs)):
            if manifest.get(key) != value:
                raise DeeprootsError(f"{out} holds a study of {manifest.get('family')} on "
                                     f"{manifest.get('data')} with {manifest.get('epochs')} "
                                     f"epochs; this one is {family} on {data} with {epochs} "
                                     f"epochs. Give "
                                     f"another --out")
        defaults = config_defaults(TrainConfig)  # a setting not given is its default
        for key, old, new in setting_differences({**defaults, **manifest.get("settings", {})},
                                                 {**defaults, **settings}):
            raise DeeprootsError(f"the study in {out} was run with {key} = {old!r}, not "
                                 f"{new!r}; its runs must share their settings. Give another "
                                 f"--out")
        manifest["models"] = list(dict.fromkeys(manifest["models"] + models))
        manifest["seeds"] = sorted(set(manifest["seeds"]) | set(seeds))
    else:
        if out.exists() and any(out.iterdir()):
            raise DeeprootsError(f"--out {out} is not empty and holds no study; give an empty or "
                                 f"new folder")
        manifest = {"family": family, "data": data, "epochs": epochs, "models": models,
                    "seeds": seeds, "settings": settings}
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, manifest)
    return manifest


def _finished(out: Path, model: str, seed: int, epochs: int, data: Optional[str] = None
              ) -> bool:
    """Whether the study's run of ``model`` and ``seed`` has finished (a folder holding
    another run counts as done here: it is never trained over, and the report names it)."""
    try:
        return _read_summary(study_run_folder(out, model, seed) / "summary.json",
                             epochs, model, seed, data) is not None
    except _Foreign:
        return True
    except ValueError:
        return False


def _train_one(folder: Path, model: str, seed: int, settings: dict) -> None:
    """One run, with its folder locked before anything in it is touched: resumed from its
    checkpoint when it has a good one, else started over what a failed start left (the
    one rule of :func:`deeproots.training.run.open_run`); a summary that cannot be read is
    never averaged in: reported, and the run finished again."""
    with RunFolder(folder).lock() as run:
        summary = run.path / "summary.json"
        try:
            _read_summary(summary, settings["epochs"])
        except ValueError as err:
            print(f"deeproots study: {err}; running {folder.name} again", file=sys.stderr)
            summary.unlink()
        train(TrainConfig(model=model, seed=seed, out=str(folder), progress=False,
                          **settings), continue_if_possible=True)
