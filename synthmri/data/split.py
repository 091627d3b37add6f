"""Subject-level train/val/test split, stratified on categorical covariates, fixed by a seed.

Subjects are ordered stratum by stratum (strata and subjects within them shuffled by the seed),
then dealt out systematically: each position goes to the split that is furthest below its target
share. Every stratum is thereby spread over the splits in proportion, totals match the fractions
as closely as integers allow, and a subject with several sessions lands in exactly one split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from synthmri.config import Params, SplitParams

SPLITS = ("train", "val", "test")


def assign_splits(subjects: pd.DataFrame, split: SplitParams, id_column: str = "subject_id") -> pd.Series:
    """Map each unique subject id to 'train', 'val' or 'test'. ``subjects`` has one row per volume."""
    per_subject = subjects.drop_duplicates(id_column).set_index(id_column).sort_index()
    rng = np.random.default_rng(split.seed)
    if split.stratify:
        strata = per_subject[split.stratify].astype(str).agg("|".join, axis=1)
    else:
        strata = pd.Series("all", index=per_subject.index)
    order: list[str] = []
    for stratum in rng.permutation(sorted(strata.unique())):
        members = sorted(strata.index[strata == stratum])
        order.extend(members[i] for i in rng.permutation(len(members)))

    targets = np.array([split.train, split.val, split.test])
    counts = np.zeros(3)
    assigned = {}
    for position, subject in enumerate(order, start=1):
        choice = int(np.argmax(targets * position - counts))
        counts[choice] += 1
        assigned[subject] = SPLITS[choice]
    return pd.Series(assigned, name="split").reindex(per_subject.index)


def split_minimums(params: Params) -> list[tuple[tuple[str, ...], int, str]]:
    """What each later stage needs of the split, as ``(splits, minimum subjects, who reads them)``.

    One list, so that a cohort too small for any reader is refused at ``normalize``, before minutes of
    training are spent on a run whose report could never be computed.
    """
    rp = params.report
    reference = tuple(rp.reference_splits)
    k = rp.prdc_k
    return [
        (
            ("train",),
            max(2, k + 1),
            f"training, and the report's Fréchet baseline (random real training subsets, "
            f"scored with the same k-NN metrics, report.prdc_k={k})",
        ),
        (("val",), 1, "validation of train_vqgan and train_diffusion"),
        ((rp.recon_split,), 1, f"the report's VQ-GAN reconstruction scores (report.recon_split={rp.recon_split})"),
        (
            reference,
            k + 1,
            f"the report's k-NN metrics on the held-out set (report.prdc_k={k}, "
            f"report.reference_splits={list(reference)})",
        ),
    ]


def check_split_sizes(subject_splits: pd.Series, params: Params) -> None:
    """Raise :class:`StageError` (one line: split, count, minimum, reader) if any split is too small."""
    from synthmri.errors import StageError

    counts = subject_splits.value_counts()
    problems = []
    for splits, minimum, reader in split_minimums(params):
        have = int(sum(counts.get(s, 0) for s in splits))
        if have < minimum:
            problems.append(f"split {'+'.join(splits)} holds {have} subject(s), {reader} need(s) at least {minimum}")
    if problems:
        total = len(subject_splits)
        raise StageError(
            f"the cohort of {total} subject(s) is too small for this pipeline: "
            + "; ".join(problems)
            + " (add subjects, or change normalize.split / report.prdc_k)"
        )
