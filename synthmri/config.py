"""Typed view of ``params.yaml``: the one place where parameters are read and checked.

Every stage receives a :class:`Params` object. Loading is strict: an unknown key or a value of the
wrong type is a :class:`ConfigError` whose message names the offending key, so a typo in
``params.yaml`` fails before any work starts instead of being silently ignored.
Overrides use the ``dvc exp run -S`` syntax (``section.key=value``, value parsed as YAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synthmri.catalog import DEMO_DIR

DEFAULT_PARAMS_FILE = Path("params.yaml")


class ConfigError(ValueError):
    """A problem in params.yaml or in a ``-S`` override; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Covariate(_Section):
    """A subject-level variable that ingest validates and the diffusion model is conditioned on."""

    name: str
    kind: Literal["continuous", "categorical"]
    range: tuple[float, float] | None = None
    levels: list[str] | None = None
    required: bool = True
    #: Where the value comes from: a ``participants.tsv`` (or ``ingest.table``) column, a BIDS sidecar key, or
    #: the raw image header (synthmri.data.acquisition).
    source: Literal["participants", "sidecar", "header"] = "participants"
    #: The sidecar key (or keys, first present wins: ``[RepetitionTimePreparation, RepetitionTime]``) or the
    #: header key (``voxel_size_mm``, ``voxel_volume_mm3``); default: the covariate's name.
    key: str | list[str] | None = None

    @model_validator(mode="after")
    def _source_has_a_key(self) -> Covariate:
        from synthmri.data.acquisition import HEADER_KEYS

        if self.source == "participants" and self.key is not None:
            raise ValueError(
                f"covariate '{self.name}': 'key' is for sidecar or header sources (the column is its name)"
            )
        if self.source == "header":
            key = self.key if self.key is not None else self.name
            if not isinstance(key, str) or key not in HEADER_KEYS:
                raise ValueError(f"covariate '{self.name}': header key {key!r} is not one of {sorted(HEADER_KEYS)}")
            if self.kind != "continuous":
                raise ValueError(f"covariate '{self.name}': a header covariate is continuous")
        if isinstance(self.key, list) and not self.key:
            raise ValueError(f"covariate '{self.name}': 'key' lists no sidecar key")
        return self

    @model_validator(mode="after")
    def _kind_matches_constraints(self) -> Covariate:
        if self.kind == "continuous" and self.levels is not None:
            raise ValueError(f"continuous covariate '{self.name}' cannot have 'levels'")
        if self.kind == "categorical":
            if not self.levels:
                raise ValueError(f"categorical covariate '{self.name}' needs 'levels'")
            if self.range is not None:
                raise ValueError(f"categorical covariate '{self.name}' cannot have 'range'")
        if self.range is not None and self.range[0] > self.range[1]:
            raise ValueError(f"covariate '{self.name}': range minimum exceeds maximum")
        return self


class DemoParams(_Section):
    """The simulated cohort built from nilearn's MNI152 template (see synthmri.data.demo)."""

    n_subjects: int = Field(128, ge=2)
    seed: int = 20261125
    template_resolution_mm: Literal[1, 2] = 2
    age_range: tuple[float, float] = (20.0, 90.0)
    sites: list[str] = Field(["site1", "site2", "site3"], min_length=1)
    noise_std: float = Field(0.03, ge=0)
    deformation_mm: float = Field(4.0, ge=0)


class IngestParams(_Section):
    """Where raw data comes from and what a valid file looks like."""

    source: Literal["demo", "bids", "table"] = "demo"
    root: str = DEMO_DIR.as_posix()
    table: str | None = None
    path_column: str = "path"
    id_column: str = "participant_id"
    session_column: str | None = "session"
    min_subjects: int = Field(8, ge=1)
    min_dim: int = Field(8, ge=1)
    max_dim: int = Field(1024, ge=1)
    max_voxels: int = Field(256**3 * 2, ge=1)
    voxel_size_mm: tuple[float, float] = (0.1, 10.0)
    max_shear: float = Field(1e-3, ge=0)


class SplitParams(_Section):
    train: float = Field(0.8, gt=0)
    val: float = Field(0.1, ge=0)
    test: float = Field(0.1, ge=0)
    seed: int = 0
    stratify: list[str] = ["sex", "site"]  # declared covariates; the Params check names any that is not

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class NormalizeParams(_Section):
    """Resampling, cropping and intensity scaling into the common training space."""

    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)
    shape: tuple[int, int, int] = (40, 48, 40)
    percentiles: tuple[float, float] = (0.5, 99.5)
    out_range: tuple[float, float] = (-1.0, 1.0)
    histogram_standardization: bool = False
    split: SplitParams = SplitParams()

    @model_validator(mode="after")
    def _valid_ranges(self) -> NormalizeParams:
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        if self.out_range[0] >= self.out_range[1]:
            raise ValueError("out_range minimum must be below its maximum")
        if min(self.spacing) <= 0 or min(self.shape) <= 0:
            raise ValueError("spacing and shape must be positive")
        return self


class VQGANModelParams(_Section):
    """Encoder/decoder widths per resolution level; len(channels) = log2(downsample_factor) + 1."""

    channels: list[int] = [16, 32]
    num_res_blocks: int = Field(1, ge=1)
    downsample_factor: Literal[2, 4, 8] = 2
    latent_channels: int = Field(4, ge=1)
    attention: bool = False
    norm_groups: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _levels_match_factor(self) -> VQGANModelParams:
        expected = self.downsample_factor.bit_length()  # 2 -> 2 levels, 4 -> 3, 8 -> 4
        if len(self.channels) != expected:
            raise ValueError(
                f"downsample_factor {self.downsample_factor} needs {expected} channel entries, got {len(self.channels)}"
            )
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"every channel count must be divisible by norm_groups={self.norm_groups}")
        return self


class QuantizerParams(_Section):
    codebook_size: int = Field(256, ge=2)
    ema_decay: float = Field(0.99, gt=0, lt=1)
    commitment_weight: float = Field(0.25, ge=0)
    dead_code_threshold: float = Field(1.0, ge=0)
    # residual stages (ResidualVectorQuantizer): each adds log2(codebook_size) bits per latent position; 1 = one codebook
    levels: int = Field(1, ge=1)


class DiscriminatorParams(_Section):
    channels: int = Field(32, ge=1)
    layers: int = Field(3, ge=1)
    slice_discriminator: bool = False


class VQGANLossParams(_Section):
    """Loss weights; perceptual = adversarial = 0 turns the VQ-GAN into the VQ-VAE baseline."""

    l1: float = Field(1.0, ge=0)
    perceptual: float = Field(0.0, ge=0)
    adversarial: float = Field(0.0, ge=0)
    feature_matching: float = Field(1.0, ge=0)
    disc_start_step: int = Field(200, ge=0)
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    lpips_weights: str | None = None
    lpips_slices_per_axis: int = Field(4, ge=1)


class TrainParams(_Section):
    """Optimisation settings shared in shape by both training stages."""

    steps: int = Field(400, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(2e-4, gt=0)
    # diffusers' schedules: the peak lr after warmup_steps of linear warm-up, then constant or decaying to 0 at `steps`
    lr_schedule: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(100, ge=1)
    val_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Scale-out: batch_size is per process and micro-step; the optimizer sees
    # batch_size × processes × grad_accumulation volumes per step.
    processes: int = Field(1, ge=1)  # DDP processes on this machine (>1: relaunched under torchrun)
    grad_accumulation: int = Field(1, ge=1)  # micro-batches accumulated per optimizer step
    # GPU path (execution only: none of these changes what is learned, so a run may resume with them toggled)
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast dtype on CUDA; on the CPU only with cpu_bf16
    # bf16 autocast on a CPU with native bf16 (AVX512-BF16 / AMX; emulated bf16 would be slower, so fp32 there)
    cpu_bf16: bool = False
    activation_checkpointing: bool = False  # recompute activations in backward: memory for compute
    channels_last: bool = False  # channels-last-3d memory format (benchmarks/RESULTS.md: where it helps)
    compile: bool = False  # torch.compile the model (long first step; pays off on long GPU runs)
    pin_memory: bool = True  # page-locked host batches, copied asynchronously to the GPU


class VQGANTrainParams(TrainParams):
    steps: int = Field(560, ge=1)
    lr_schedule: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.99)
    val_every: int = Field(280, ge=1)
    # bf16 autoencoder steps: 1.9x faster on the demo's EPYC, the same PSNR at equal steps (RESULTS.md, 15th session);
    # the non-finite bf16 weight gradients seen in the diffusion U-Net came from 2x2x2 feature maps only
    cpu_bf16: bool = True
    channels_last: bool = True  # 1.15-1.2x faster fp32 steps on an Ice Lake Xeon, 1.07x on the EPYC (RESULTS.md)
    lr_discriminator: float = Field(2e-4, gt=0)
    flip_lr: float = Field(0.0, ge=0, le=1)  # probability of mirroring a training volume left-right (augmentation)


class VQGANParams(_Section):
    model: VQGANModelParams = VQGANModelParams()
    quantizer: QuantizerParams = QuantizerParams()
    discriminator: DiscriminatorParams = DiscriminatorParams()
    loss: VQGANLossParams = VQGANLossParams()
    train: VQGANTrainParams = VQGANTrainParams()


class EncodeParams(_Section):
    batch_size: int = Field(8, ge=1)
    #: also encode each training volume's left-right mirror image; the diffusion model trains on both
    mirror_training: bool = True
    #: what the diffusion model learns: the VQ-GAN's ``codes`` (each position snapped to one of its codebook
    #: vectors), or the encoder's ``continuous`` output before the codebook, which keeps more of each volume
    #: (the acquisition's texture among it) for the decoder
    latents: Literal["codes", "continuous"] = "codes"

    @property
    def quantized(self) -> bool:
        """Whether the latents are codebook vectors (``VQGAN.encode(x, quantize=...)``)."""
        return self.latents == "codes"


def res_blocks_per_level(num_res_blocks: int | list[int] | tuple[int, ...], levels: int) -> list[int]:
    """The U-Net's residual blocks per level, from one count for every level (>= 1) or one count per level (>= 0).

    The one owner of this rule: the config calls it so a bad params.yaml fails at load with the key's name, the
    U-Net calls it so a direct construction fails the same way.

    Raises:
        ValueError: a single count below 1, or a list of the wrong length or with a negative count.
    """
    if isinstance(num_res_blocks, int):
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1 (or one count >= 0 per level), got {num_res_blocks}")
        return [num_res_blocks] * levels
    if len(num_res_blocks) != levels or min(num_res_blocks) < 0:
        raise ValueError(f"num_res_blocks needs one count >= 0 per level ({levels}), got {list(num_res_blocks)}")
    return list(num_res_blocks)


class UNetParams(_Section):
    """Diffusion U-Net: one entry per resolution level in ``channels`` and ``attention``."""

    channels: list[int] = [32, 64]
    attention: list[bool] = [False, True]
    # one count for every level, or one per level: [0, 1, 1] gives the finest level only an input conv, a downsample
    # and one residual block on the way up (a cheap full-resolution path)
    num_res_blocks: int | list[int] = 1
    num_heads: int = Field(4, ge=1)
    norm_groups: int = Field(8, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    cross_attention: bool = False
    patch_size: int = Field(2, ge=1)  # fold patch_size^3 latent positions into channels (space-to-depth)
    # width of the time + covariate embedding that modulates every residual block; null = 4 x channels[0], so a
    # narrow finest level would otherwise narrow the conditioning of the whole network
    emb_dim: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _levels_agree(self) -> UNetParams:
        if len(self.attention) != len(self.channels):
            raise ValueError(f"attention needs one flag per level ({len(self.channels)}), got {len(self.attention)}")
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"every channel count must be divisible by norm_groups={self.norm_groups}")
        res_blocks_per_level(self.num_res_blocks, len(self.channels))
        return self


class ScheduleParams(_Section):
    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)
    # what the network predicts: epsilon (the noise) or v on the DDPM process above; flow = rectified flow
    # (x_t = (1 - s)·x0 + s·noise at s = t / num_train_timesteps, target noise - x0; the beta_* keys are unused)
    prediction: Literal["epsilon", "v_prediction", "flow"] = "flow"
    # standardized latents x input_scale are what gets noised (Chen 2023): < 1 = lower SNR at every timestep
    input_scale: float = Field(1.0, gt=0)
    # how latents are standardized before noising: channel = per-channel mean/std (scale.json); position =
    # per-position mean/std of the training latents (the model then learns deviations from the average brain)
    standardize: Literal["channel", "position"] = "position"


class DiffusionTrainParams(TrainParams):
    steps: int = Field(3800, ge=1)
    batch_size: int = Field(4, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    # bf16 diffusion steps: 1.2-1.3x faster on the demo's EPYC at batch 4; convolutions on maps under 4 voxels a side
    # stay fp32 (models/blocks.py), where oneDNN's bf16 weight gradients were non-finite (RESULTS.md, 16th session)
    cpu_bf16: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    condition_dropout: float = Field(0.1, ge=0, le=1)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    sample_every: int = Field(1900, ge=1)
    # how the per-timestep losses are weighted: none = plain MSE on the target; min_snr = Hang et al. 2023's
    # min-SNR-gamma (each timestep's weight on the x0 error capped at gamma, so easy low-noise steps stop
    # dominating the gradient)
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = Field(5.0, gt=0)
    # density of the training timesteps: uniform, or logit_normal = SD3's (Esser et al. 2024) t / T =
    # sigmoid(N(0, 1)), which trains the middle noise levels most
    # logit_normal with flow: FD 6.4/6.1 -> 4.6/5.0, precision 0.34/0.44 -> 0.63/0.72 at 4160 steps (2 seeds, RESULTS.md)
    timestep_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    # the covariates classifier-free guidance amplifies; null = all. A group (e.g. [age, sex]) is also dropped on its
    # own, the others kept, with probability guided_dropout: guidance's reference branch is then "the group
    # unspecified", so guidance strengthens the group's effects and leaves the acquisition's contrast as asked.
    # A cohort without age or sex names its own group (or null)
    guided_covariates: list[str] | None = ["age", "sex"]
    guided_dropout: float = Field(0.15, ge=0, le=1)
    # the covariate encoder's learning rate is lr x this (the U-Net's stays lr). 5 strengthens the age effects but
    # pushes the sequence predictor over the gate (RESULTS.md, 28th session): 1
    covariate_lr_scale: float = Field(1.0, gt=0)


class SamplerParams(_Section):
    sampler: Literal["ddpm", "ddim", "dpm_solver"] = "dpm_solver"
    # DPM-Solver++ 10 vs 25 steps: 1.9x faster, same FD and effects, diversity 0.81 vs 0.83 (benchmarks/RESULTS.md)
    steps: int = Field(10, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    # snap each sampled latent to its nearest codebook entries before decoding (what the decoder was trained on), or
    # decode it as sampled: continuous decoding gave a lower FD ratio and higher precision and coverage in two draws of
    # 64 volumes from the demo's model (RESULTS.md, 16th session)
    snap_to_codes: bool = False
    # (low, high]: guide only the steps whose noise level sigma = 1/sqrt(SNR) lies in it, the others conditional only
    # (Kynkaanniemi et al. 2024); null = guide every step
    guidance_interval: tuple[float, float] | None = None
    # with diffusion.train.guided_covariates: the guidance of the other covariates (the acquisition), a second
    # guidance term (eps_null + r (eps_ref - eps_null) + s (eps_cond - eps_ref)); 1 = no second term, no extra pass
    rest_guidance_scale: float = Field(1.5, ge=0)

    @field_validator("guidance_interval")
    @classmethod
    def _interval_is_ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] < value[1]:
            raise ValueError(f"guidance_interval must be (low, high) with 0 <= low < high, got {list(value)}")
        return value


class DiffusionParams(_Section):
    unet: UNetParams = UNetParams()
    schedule: ScheduleParams = ScheduleParams()
    train: DiffusionTrainParams = DiffusionTrainParams()
    sampler: SamplerParams = SamplerParams()

    @model_validator(mode="before")
    @classmethod
    def _no_second_term_without_a_group(cls, data):
        """Without a guided group there is no second guidance term: a config that turns the group off and says
        nothing of ``rest_guidance_scale`` (a params.yaml from before the term existed) samples with 1."""
        if isinstance(data, dict):
            train, sampler = data.get("train"), data.get("sampler", {})
            if (
                isinstance(train, dict)
                and "guided_covariates" in train
                and train["guided_covariates"] is None
                and isinstance(sampler, dict)
                and "rest_guidance_scale" not in sampler
            ):
                data = {**data, "sampler": {**sampler, "rest_guidance_scale": 1.0}}
        return data

    @model_validator(mode="after")
    def _sampler_fits_model(self) -> DiffusionParams:
        if self.schedule.prediction == "flow" and self.sampler.sampler == "ddpm":
            raise ValueError("a flow model samples with sampler: ddim (Euler) or dpm_solver, not ddpm")
        if self.sampler.rest_guidance_scale != 1 and self.train.guided_covariates is None:
            raise ValueError(
                f"diffusion.sampler.rest_guidance_scale {self.sampler.rest_guidance_scale:g} guides the covariates "
                "outside diffusion.train.guided_covariates, which is null: name a group, or set rest_guidance_scale: 1"
            )
        return self


class SampleParams(_Section):
    """Which synthetic subjects to make (the covariate plan) and how to fan the work out."""

    plan: Literal["match_training", "grid", "csv"] = "match_training"
    n_samples: int = Field(256, ge=1)
    grid: dict[str, list[float | str]] = {}
    per_cell: int = Field(1, ge=1)
    csv: str | None = None
    seed: int = 0
    shard_size: int = Field(4, ge=1)
    task_runner: Literal["threads", "dask"] = "threads"
    workers: int = Field(2, ge=1)
    dask_address: str | None = None
    release: str = "dev"
    # intra-op CPU threads of every generating task, wherever it runs: part of a volume's recipe
    # (a reduction's last bits depend on it), so it is recorded in the manifest
    torch_threads: int = Field(1, ge=1)
    # volumes per network call, on a fixed grid (sample i runs at position i % micro_batch): batching
    # without changing any volume's bytes with the shard or its neighbours (synthmri.diffusion.sampling)
    micro_batch: int = Field(1, ge=1)
    # how the finished set is laid out: loose NIfTI files, or WebDataset tar shards of volumes_per_tar
    # volumes (few large files: cheap for DVC, streamable; synthmri.data.shards)
    layout: Literal["files", "webdataset"] = "files"
    volumes_per_tar: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _shards_hold_whole_micro_batches(self) -> SampleParams:
        if self.shard_size % self.micro_batch:
            raise ValueError(
                f"shard_size ({self.shard_size}) must be a multiple of micro_batch ({self.micro_batch}): "
                "a micro-batch cannot straddle two shards"
            )
        return self


class ReportThresholds(_Section):
    """The quality gate: each check compares one number of ``reports/metrics.json`` with its threshold.

    ``null`` switches a check off. A check whose metric does not apply (e.g. no ``age`` covariate)
    is skipped; one whose metric could not be computed fails. Defaults are meant for a model worth
    publishing, not for a short CPU demo run (a smoke run is expected to fail the gate).
    """

    # VQ-GAN reconstruction of the test split (intensities in normalize.out_range; data range = its width)
    min_recon_psnr: float | None = 24.0
    min_recon_ssim: float | None = 0.75
    # fidelity on features of report.extractor, standardized with the held-out real set's statistics
    max_frechet_distance: float | None = None  # absolute; depends on the extractor and the set sizes
    max_frechet_ratio: float | None = 3.0  # FD(synthetic, held-out) / FD(real training subset, held-out)
    min_precision: float | None = 0.5
    min_recall: float | None = None
    min_coverage: float | None = 0.5
    # diversity: (1 - MS-SSIM within synthetic) / (1 - MS-SSIM within real held-out)
    min_diversity_ratio: float | None = 0.7
    # in-head intensity distributions (Wasserstein-1, in normalize.out_range units)
    max_intensity_wasserstein: float | None = 0.1
    # known effects (age -> CSF fraction / ventricle slope, sex -> head size): synthetic / real effect
    min_effect_ratio: float | None = 0.5
    # acquisition covariates whose GM/WM-contrast effect is gated with min_effect_ratio: only those a real-vs-real
    # baseline of the demo cohort passes in >= 95 % of draws (RESULTS.md). Sequence (SPGR - MPRAGE): 100 %. Not
    # gated, reported: inversion time (54 % at 32 synthetic volumes, 77 % at 128, since the SPGR protocols
    # took a third of the subjects out of its slope: r = 0.23 in the real cohort) and field strength (its real
    # GM/WM effect is never significant).
    acquisition_effects: list[str] = ["sequence"]
    # covariate predictors fitted on real training features: MAE(synthetic) / MAE(real held-out) ...
    max_predictor_error_ratio: float | None = 2.0
    # ... and accuracy(real held-out) - accuracy(synthetic) for categorical covariates
    max_predictor_accuracy_drop: float | None = 0.2
    # utility (reports/utility.json, issue 19): lower end of the 95 % interval of the gain in the primary target's
    # error from pre-training a 3D ViT on the set, fine-tuned on utility.gate_k real subjects: > 0 = the set helps
    min_utility_gain_ci_low: float | None = 0.0
    # privacy: fraction of likely copies minus the most that a set of new real subjects reaches in 95 draws of
    # 100 (synthmri.metrics.privacy.chance_copy_fraction; re-derived from the real-vs-real baseline, RESULTS.md)
    max_copy_fraction_over_chance: float | None = 0.0
    # privacy: synthetic volumes closer to a training volume than halfway from the threshold to identical
    max_near_duplicates: int | None = Field(0, ge=0)


class ProtocolSweepParams(_Section):
    """One subject under each protocol (synthmri.report.protocol_sweep): a few subjects generated with the same
    seeds under every acquisition combination of the real training set, so that the acquisition is the only
    thing that changes between a row's volumes."""

    subjects: int = Field(2, ge=0)  # 0 switches the sweep off
    max_protocols: int = Field(8, ge=2)  # the most frequent combinations, when the training set has more
    # covariates left unspecified: on the demo the site decides the scanner, so a fixed site would fight the
    # requested protocol. Names that are not declared covariates are ignored (with a log line).
    unspecified: list[str] = ["site"]


class ReportParams(_Section):
    """The quality and privacy report of a synthetic set against the real held-out data (synthmri.report)."""

    extractor: Literal["stats", "medicalnet", "lpips"] = "stats"
    extractor_weights: str | None = None
    reference_splits: list[Literal["val", "test"]] = Field(["val", "test"], min_length=1)
    recon_split: Literal["val", "test"] = "test"
    prdc_k: int = Field(5, ge=1)
    compare_size: int | None = Field(32, ge=2)
    max_comparisons: int = Field(32, ge=1)
    max_pairs: int = Field(300, ge=1)
    privacy_metric: Literal["ncc", "ssim"] = "ncc"
    privacy_quantile: float = Field(0.99, gt=0, le=1)
    ssim_shortlist: int = Field(5, ge=1)
    n_pairs: int = Field(5, ge=1)
    n_examples: int = Field(4, ge=1)
    histogram_bins: int = Field(64, ge=4)
    seed: int = 0
    vqvae_metrics: str | None = "reports/vqvae.json"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    blas_threads: int | None = Field(1, ge=1)
    protocol_sweep: ProtocolSweepParams = ProtocolSweepParams()
    thresholds: ReportThresholds = ReportThresholds()


class ViTParams(_Section):
    """Size of the utility stage's 3D ViT (MONAI ``monai.networks.nets.ViT``): a CPU-sized transformer."""

    patch_size: int = Field(8, ge=1)  # 40x48x40 demo volumes -> 5x6x5 = 150 tokens
    hidden_size: int = Field(96, ge=8)
    mlp_dim: int = Field(192, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ViTParams:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vit.hidden_size {self.hidden_size} must be a multiple of vit.num_heads {self.num_heads}")
        return self


class FitParams(_Section):
    """One training phase of the utility ViT (pre-training or fine-tuning): AdamW with cosine decay."""

    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.05, ge=0)


class UtilityParams(_Section):
    """Does pre-training a 3D ViT on the synthetic set help on real data? (synthmri.utility, issue 19)

    Pre-train on ``data/synthetic`` (targets: the covariates each volume was generated for), fine-tune on k
    real training-split subjects, test on the real held-out splits (``report.reference_splits``); compare with
    the same ViT from scratch, pre-trained on the real training split, and pre-trained on a negative control.
    """

    #: covariates the ViT predicts (pre-training uses each one present in the set); null = all declared ones
    targets: list[str] | None = None
    primary: str = "age"  # the target whose gain the gate reads
    k: list[int | Literal["all"]] = [4, 8, 16, "all"]  # real training subjects per fine-tuning run
    repeats: int = Field(2, ge=1)  # seeds x draws of the k subjects (pre-training is repeated with the seed)
    negative_control: Literal["shuffled", "mean_noise"] = "shuffled"
    vit: ViTParams = ViTParams()
    pretrain: FitParams = FitParams(steps=300, batch_size=16, lr=5e-4)
    #: fine-tuning of a pre-trained ViT: gentle (a high learning rate on k subjects erases what pre-training learnt)
    finetune: FitParams = FitParams(steps=100, batch_size=8, lr=3e-5)
    #: the scratch arm's training on the same k subjects: the learning rate a random ViT needs to learn at all
    scratch: FitParams = FitParams(steps=150, batch_size=8, lr=3e-4)
    bootstrap: int = Field(1000, ge=100)  # resamples of test subjects and repeats for every interval
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: repeats run at once, in threads, each on ``torch_threads`` intra-op threads: small ViT ops scale poorly over
    #: cores, so 2 repeats x 1 thread run 1.8x faster than one after the other on 2 threads (RESULTS.md, 17th session)
    workers: int = Field(2, ge=1)
    torch_threads: int = Field(1, ge=1)  # per worker; fixed, so the results do not depend on `workers` or the machine
    #: the k whose pre-training gain on ``primary`` the gate reads (report.thresholds.min_utility_gain_ci_low)
    #: 16, not 8: with 2 repeats and 26 test subjects a perfect generator's interval clears 0 at k = 16 in 3 of 3
    #: draws and at k = 8 in 2 of 3 (benchmarks/bench_utility_baseline.py, RESULTS.md)
    gate_k: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _dropout_needs_one_worker(self) -> UtilityParams:
        if self.vit.dropout > 0 and self.workers > 1:
            raise ValueError(
                "utility.vit.dropout > 0 draws from torch's global generator, which parallel repeats would share: "
                "set utility.workers: 1"
            )
        return self

    @model_validator(mode="after")
    def _gate_k_is_run(self) -> UtilityParams:
        if self.gate_k not in self.k:
            raise ValueError(f"utility.gate_k {self.gate_k} is not one of utility.k {self.k}")
        return self


class Params(_Section):
    """All of params.yaml. Sections are added here as stages are added to dvc.yaml."""

    seed: int = 1234
    covariates: list[Covariate] = [
        Covariate(name="age", kind="continuous", range=(18.0, 100.0)),
        Covariate(name="sex", kind="categorical", levels=["F", "M"]),
        Covariate(name="site", kind="categorical", levels=["site1", "site2", "site3"], required=False),
        Covariate(
            name="field_strength",
            kind="continuous",
            range=(0.5, 7.5),
            required=False,
            source="sidecar",
            key="MagneticFieldStrength",
        ),
        Covariate(
            name="inversion_time",
            kind="continuous",
            range=(0.3, 3.0),
            required=False,
            source="sidecar",
            key="InversionTime",
        ),
        Covariate(
            name="sequence",
            kind="categorical",
            levels=["MPRAGE", "SPGR"],
            required=False,
            source="sidecar",
            key="PulseSequenceType",
        ),
        Covariate(
            name="voxel_size", kind="continuous", range=(0.5, 8.0), required=False, source="header", key="voxel_size_mm"
        ),
    ]
    demo: DemoParams = DemoParams()
    ingest: IngestParams = IngestParams()
    normalize: NormalizeParams = NormalizeParams()
    vqgan: VQGANParams = VQGANParams()
    encode: EncodeParams = EncodeParams()
    diffusion: DiffusionParams = DiffusionParams()
    sample: SampleParams = SampleParams()
    report: ReportParams = ReportParams()
    utility: UtilityParams = UtilityParams()

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        names = [c.name for c in self.covariates]
        if len(set(names)) != len(names):
            raise ValueError(f"covariate names must be unique, got {names}")
        unknown = [s for s in self.normalize.split.stratify if s not in names]
        if unknown:
            raise ValueError(f"normalize.split.stratify names unknown covariates {unknown}")
        unknown_grid = [k for k in self.sample.grid if k not in names]
        if unknown_grid:
            raise ValueError(f"sample.grid names unknown covariates {unknown_grid}")
        guided = self.diffusion.train.guided_covariates
        if guided is not None and (not guided or [g for g in guided if g not in names]):
            raise ValueError(f"diffusion.train.guided_covariates must name declared covariates {names}, got {guided}")
        if self.ingest.source == "demo" and "site" in names:
            levels = self.covariate("site").levels or []
            foreign = [s for s in self.demo.sites if s not in levels]
            if foreign:
                raise ValueError(f"demo.sites {foreign} are not levels of the 'site' covariate {levels}")
        known_targets = self.utility.targets if self.utility.targets is not None else names
        unknown_targets = [t for t in [*known_targets, self.utility.primary] if t not in names]
        if unknown_targets:
            raise ValueError(f"utility.targets/primary name unknown covariates {unknown_targets}")
        if self.utility.primary not in known_targets:
            raise ValueError(f"utility.primary '{self.utility.primary}' is not one of utility.targets {known_targets}")
        return self

    def covariate(self, name: str) -> Covariate:
        return next(c for c in self.covariates if c.name == name)


# ----------------------------------------------------------------------------------------------
# loading


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{key}': value '{raw}' is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def _apply_override(tree: dict, parts: list[str], value: Any) -> None:
    node: Any = tree
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"override '{'.'.join(parts)}': '{where}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(parts))] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override '{where}': expected an index below {len(node)}")
    return int(part)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            got = err.get("input")
            got_txt = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"{source}: '{key}': {err['msg']}{got_txt}")
    return "\n".join(lines)


def load_params(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read params.yaml (or ``path``), apply ``-S`` overrides, and validate everything at once."""
    path = Path(path) if path is not None else DEFAULT_PARAMS_FILE
    if path.exists():
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    elif path == DEFAULT_PARAMS_FILE:
        raise ConfigError(
            f"no {DEFAULT_PARAMS_FILE} in {Path.cwd()}: run from the repository root (where dvc.yaml "
            "and params.yaml are) or pass --params FILE"
        )
    else:
        raise ConfigError(f"params file '{path}' does not exist")
    for text in overrides:
        parts, value = _parse_override(text)
        _apply_override(tree, parts, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(path))) from None
