"""Subject-level train/val/test split, stratified on categorical covariates, fixed by a seed.

Subjects are ordered stratum by stratum (strata and subjects within them shuffled by the seed),
then dealt out systematically: each position goes to the split that is furthest below its target
share. Every stratum is thereby spread over the splits in proportion, totals match the fractions
as closely as integers allow, and a subject with several sessions lands in exactly one split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from synthmri.config import SplitParams

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
