"""The utility protocol: pre-train a 3D ViT on a set, fine-tune it on k real subjects, test on held-out ones.

Arms (each fine-tuned on the same k real training-split subjects and tested on the same real held-out
subjects; the pre-trained arms with the same recipe and batches, scratch with the learning rate a random ViT
needs):

* ``scratch``: no pre-training;
* ``synthetic``: pre-trained on the synthetic set (targets: the covariates each volume was generated for);
* ``real``: pre-trained on the whole real training split (the reference a synthetic set should approach);
* ``control``: pre-trained on a negative control of the synthetic set's size (:func:`negative_control`),
  which must not show the gain;
* ``tstr`` / ``trtr``: the synthetic / real pre-trained models tested without fine-tuning (train on
  synthetic, test on real; train on real, test on real), with the same training budget.

Held-out subjects never enter pre-training or fine-tuning (:func:`check_no_leakage` runs before every fit).
"""

from __future__ import annotations

import copy
import functools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from synthmri.config import UtilityParams
from synthmri.errors import StageError
from synthmri.logs import get_logger, progress
from synthmri.training.runtime import intra_op_threads
from synthmri.utility.fit import fit, predict
from synthmri.utility.targets import TargetCodec
from synthmri.utility.vit import ViTRegressor

log = get_logger(__name__)

PRETRAINED_ARMS = ("synthetic", "real", "control")
FINETUNED_ARMS = ("scratch", *PRETRAINED_ARMS)
_GLOBAL_RNG = threading.Lock()  # held while a model is initialised from torch's global generator


@dataclass
class UtilitySets:
    """The volumes of the protocol, ``(N, 1, D, H, W)`` float32 tensors, with their covariate tables. The real
    tables carry ``subject_id`` (one subject may have several volumes)."""

    train: pd.DataFrame
    train_volumes: torch.Tensor
    test: pd.DataFrame
    test_volumes: torch.Tensor
    synthetic: pd.DataFrame
    synthetic_volumes: torch.Tensor

    @classmethod
    def from_report_data(cls, data) -> UtilitySets:
        """The report's inputs (:class:`~synthmri.report.inputs.ReportData`): its training split, its held-out
        reference splits and the synthetic set, as ``(N, 1, D, H, W)`` tensors."""

        def tensor(volumes: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(volumes[:, None], dtype=np.float32))

        return cls(
            train=data.real.iloc[data.train_index].reset_index(drop=True),
            train_volumes=tensor(data.train),
            test=data.real.iloc[data.reference_index].reset_index(drop=True),
            test_volumes=tensor(data.reference),
            synthetic=data.synthetic.reset_index(drop=True),
            synthetic_volumes=tensor(data.synthetic_volumes),
        )


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed from the protocol's seed and the run's coordinates (stable across Python processes)."""
    words = [p if isinstance(p, int) else int.from_bytes(p.encode(), "little") % (2**32) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def check_no_leakage(test_subjects, **used) -> None:
    """Raise :class:`StageError` if a held-out subject is in any set a model trains on (``name=subject ids``)."""
    held_out = {str(s) for s in test_subjects}
    for name, subjects in used.items():
        leaked = sorted(held_out & {str(s) for s in subjects})
        if leaked:
            raise StageError(
                f"utility: held-out subject(s) {', '.join(leaked[:5])} would be used for {name}: the test would "
                "measure memory, not utility"
            )


def negative_control(sets: UtilitySets, kind: str, seed: int) -> tuple[torch.Tensor, pd.DataFrame]:
    """A pre-training set of the synthetic set's size that carries no usable covariate signal.

    ``shuffled``: the synthetic volumes with their covariate rows permuted (same images, same label
    distribution, no link between them); ``mean_noise``: the real training mean volume plus Gaussian noise with
    the training set's voxel-wise standard deviation (no anatomy), labelled with the synthetic covariates."""
    rng = np.random.default_rng(seed)
    table = sets.synthetic.reset_index(drop=True)
    if kind == "shuffled":
        order = rng.permutation(len(table))
        return sets.synthetic_volumes, table.iloc[order].reset_index(drop=True)
    if kind == "mean_noise":
        mean = sets.train_volumes.mean(dim=0, keepdim=True)
        std = sets.train_volumes.std(dim=0, keepdim=True) if len(sets.train_volumes) > 1 else torch.zeros_like(mean)
        noise = torch.from_numpy(rng.standard_normal((len(table), *mean.shape[1:]), dtype=np.float32))
        return mean + noise * std, table
    raise ValueError(f"unknown negative control {kind!r}")


def draw_subjects(train: pd.DataFrame, k: int | str, seed: int) -> np.ndarray:
    """Row indices of every volume of ``k`` subjects drawn from the training table (``all``: every subject)."""
    subjects = np.array(sorted(train["subject_id"].astype(str).unique()))
    if k != "all":
        if int(k) > len(subjects):
            raise StageError(f"utility.k={k} asks for more subjects than the training split has ({len(subjects)})")
        subjects = np.random.default_rng(seed).choice(subjects, size=int(k), replace=False)
    return np.flatnonzero(train["subject_id"].astype(str).isin(subjects).to_numpy())


class Protocol:
    """Runs every arm and returns one row per (arm, k, repeat, test volume, target) with its error."""

    def __init__(
        self,
        up: UtilityParams,
        codec: TargetCodec,
        sets: UtilitySets,
        device: torch.device,
        on_curve: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.up, self.codec, self.sets, self.device = up, codec, sets, device
        self.on_curve = on_curve  # (curve name, step, loss), e.g. to MLflow
        self.shape = tuple(sets.train_volumes.shape[2:])
        self.test_subjects = sets.test["subject_id"].astype(str).unique()
        check_no_leakage(self.test_subjects, real_pretraining=sets.train["subject_id"])

    def new_model(self, seed: int) -> ViTRegressor:
        """A ViT initialised from ``seed``: torch's global generator, so one thread at a time (workers)."""
        with _GLOBAL_RNG:
            torch.manual_seed(seed)
            return ViTRegressor(self.up.vit, self.shape, self.codec.n_outputs).to(self.device)

    def _fit(self, model, volumes, table, phase, seed, curve: str, repeat: _Repeat) -> None:
        values, known = self.codec.encode(table)
        if not known.any():
            raise StageError(f"utility: no target covariate ({', '.join(t.name for t in self.codec.targets)}) "
                             f"is known for any volume of {curve.split('.')[0]}")  # fmt: skip
        losses = fit(model, volumes, values, known, self.codec, phase, seed)
        repeat.curves += [(curve, step, loss) for step, loss in enumerate(losses) if step % 10 == 0]

    def _score(self, model, arm: str, k_label: str, repeat: int) -> list[dict]:
        errors = self.codec.errors(predict(model, self.sets.test_volumes), self.sets.test)
        ids = self.sets.test["item_id"].astype(str) if "item_id" in self.sets.test else self.sets.test.index.astype(str)
        return [
            {"arm": arm, "k": k_label, "repeat": repeat, "item": item, "target": target, "error": float(e)}
            for target, values in errors.items()
            for item, e in zip(ids, values)
        ]

    def sources(self, repeat: int) -> dict[str, tuple[torch.Tensor, pd.DataFrame]]:
        s = self.sets
        control = negative_control(s, self.up.negative_control, derived_seed(self.up.seed, repeat, "control-set"))
        return {"synthetic": (s.synthetic_volumes, s.synthetic), "real": (s.train_volumes, s.train), "control": control}

    @property
    def runs_per_repeat(self) -> int:
        return len(PRETRAINED_ARMS) + len(self.up.k) * len(FINETUNED_ARMS)

    def run(self) -> pd.DataFrame:
        """Every pre-training and fine-tuning run under one progress bar; ``utility.workers`` repeats at once (threads,
        each on ``utility.torch_threads`` intra-op threads). A repeat's runs depend only on their seeds, so the
        rows are the same whatever ``workers`` is. Loss curves go to ``on_curve`` at the end, from this thread
        (MLflow's active run is per thread)."""
        done: queue.Queue[int] = queue.Queue()
        failed = threading.Event()  # one repeat's error stops the others at their next run
        workers = min(self.up.workers, self.up.repeats)
        with ThreadPoolExecutor(workers, thread_name_prefix="utility-repeat") as pool:
            futures = [pool.submit(self._run_repeat, r, done, failed) for r in range(self.up.repeats)]
            total = self.up.repeats * self.runs_per_repeat
            for _ in progress(_finished_runs(done, futures, total), "Utility: pre-training and fine-tuning ViTs", "run",
                              total=total):  # fmt: skip
                pass
            repeats = [future.result() for future in futures]  # re-raises a worker's error
        if self.on_curve is not None:
            for repeat in repeats:
                for curve in repeat.curves:
                    self.on_curve(*curve)
        return pd.DataFrame([row for repeat in repeats for row in repeat.rows])

    def _run_repeat(self, index: int, done: queue.Queue[int], failed: threading.Event) -> _Repeat:
        repeat = _Repeat(index)
        runs = [functools.partial(self._pretrain, repeat, name, *data) for name, data in self.sources(index).items()]
        runs += [functools.partial(self._finetune, repeat, k, arm) for k in self.up.k for arm in FINETUNED_ARMS]
        with intra_op_threads(self.up.torch_threads):
            for run in runs:
                if failed.is_set():
                    break
                try:
                    run()
                except BaseException:
                    failed.set()
                    raise
                done.put(1)
        return repeat

    def _pretrain(self, repeat: _Repeat, name: str, volumes, table) -> None:
        up, r = self.up, repeat.index
        log.info("Repeat %d: pre-training the ViT on the %s set (%d volumes)", r + 1, name, len(volumes))
        model = self.new_model(derived_seed(up.seed, r, "init", name))
        self._fit(model, volumes, table, up.pretrain, derived_seed(up.seed, r, "pretrain", name),
                  f"pretrain.{name}.r{r}", repeat)  # fmt: skip
        repeat.pretrained[name] = copy.deepcopy(model.state_dict())
        if name in ("synthetic", "real"):  # trained on synthetic / on real, tested on real, same budget
            repeat.rows += self._score(model, "tstr" if name == "synthetic" else "trtr", "-", r)

    def _finetune(self, repeat: _Repeat, k, arm: str) -> None:
        up, r = self.up, repeat.index
        subset = draw_subjects(self.sets.train, k, derived_seed(up.seed, r, "draw", str(k)))
        chosen = self.sets.train.iloc[subset]
        check_no_leakage(self.test_subjects, fine_tuning=chosen["subject_id"])
        model = self.new_model(derived_seed(up.seed, r, "init", "scratch"))
        if arm != "scratch":
            model.load_state_dict(repeat.pretrained[arm])
        # the same k subjects for every arm, and the same batches for every pre-trained arm: paired comparisons.
        # A pre-trained ViT is fine-tuned gently (utility.finetune); one from scratch gets the learning rate it
        # needs to learn at all (utility.scratch): one recipe for both would handicap one side (RESULTS.md)
        phase = up.scratch if arm == "scratch" else up.finetune
        self._fit(model, self.sets.train_volumes[subset], chosen, phase,
                  derived_seed(up.seed, r, "finetune", str(k)), f"finetune.{arm}.k{k}.r{r}", repeat)  # fmt: skip
        repeat.rows += self._score(model, arm, str(k), r)


@dataclass
class _Repeat:
    """What one repeat's runs produce: its pre-trained weights (per arm), score rows and loss curves."""

    index: int
    pretrained: dict[str, dict] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    curves: list[tuple[str, int, float]] = field(default_factory=list)


def _finished_runs(done: queue.Queue[int], futures: list[Future], total: int) -> Iterator[int]:
    """One item per finished run, for the progress bar; stops early when a worker failed (its error is raised
    by the caller)."""
    finished = 0
    while finished < total:
        try:
            finished += done.get(timeout=0.5)
        except queue.Empty:
            if any(f.done() and f.exception() is not None for f in futures):
                return
            continue
        yield finished
