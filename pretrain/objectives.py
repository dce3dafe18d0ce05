"""Self-supervised objectives on the spectrogram ViT: MAE, an EMA teacher, ELECTRA-style detection, metric learning.

The file reads top to bottom: masking strategies and the MAE decoder and loss; the EMA teacher's decay schedule
and targets; patch corruption and the detection loss; clip-level metric losses (NT-Xent between views,
hierarchical-margin triplets for labelled clips) with negatives from every rank; then `Pretrainer`, the module the
trainer runs, which combines the enabled objectives with their weights. An objective with weight 0 is not built.

Patches are the backbone's 16x16 patches of the normalised log-mel image, in its token order (frequency-major);
`patchify`/`unpatchify` move between the image and the sequence of non-overlapping ones. The teacher and ELECTRA need
non-overlapping patches; MAE also trains patches that overlap in frequency (the fine-tuning recipe's geometry) by
hiding whole time columns, and reconstructs each token's own patch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from pretrain.backbone import Backbone, BackboneConfig, Block, patchify, sincos_grid, unpatchify
from pretrain.encoder import AudioEncoder
from pretrain.frontend import ResizeCrop, SpecAugment

# ----------------------------------------------------------------------------------------------------
# Configuration (plain data; the recipe's `objectives` section)

MASKINGS = ("random", "time", "frequency", "block")


def check_masking(section: str, masking: str, ratio: float) -> None:
    """ValueError naming `section` for an unknown masking strategy or a mask ratio outside (0, 1)."""
    if masking not in (*MASKINGS, "mixed"):
        raise ValueError(f"{section}.masking must be one of {', '.join(MASKINGS)}, mixed; got {masking!r}")
    if not 0 < ratio < 1:
        raise ValueError(f"{section}.mask_ratio must be between 0 and 1; got {ratio}")


@dataclass
class MAEConfig:
    """Masked autoencoder: encoder on visible patches only, light decoder, loss on masked patches."""

    weight: float = 1.0
    mask_ratio: float = 0.8
    masking: str = "random"  # random | time | frequency | block | mixed (one of the four per batch); time alone
    # for patches overlapping in frequency, where it hides round(mask_ratio * time columns) whole columns
    block_size: int = 2  # patches per side of a block for block masking
    decoder_hidden_size: int = 256
    decoder_layers: int = 4
    decoder_heads: int = 8
    decoder_intermediate_size: int = 1024
    norm_pix_loss: bool = True  # target = each patch normalised to zero mean, unit variance

    def __post_init__(self) -> None:
        check_masking("mae", self.masking, self.mask_ratio)


@dataclass
class TeacherConfig:
    """Masked prediction of a teacher's patch representations (data2vec, M2D): the student encodes the visible
    patches, a small predictor fills in the masked positions, and the targets are the teacher's layer-normalised
    output tokens there. The teacher sees every patch and is an exponential moving average of the student, its
    decay rising from `ema_decay` to `ema_decay_end` over the run (cosine), so short runs get a teacher that moves.
    With data.views >= 2 the teacher encodes the clip's last view and the student the first (BYOL-A, M2D): with
    the recipe's `augment` each view is coloured on its own, so the student learns what survives the colouring. The
    targets are matched by patch position, so the views should cover the same time: data.view_source=channels
    (one crop, a view per channel: the two renderings of a `shards synth --pair-fonts` track, which differ by
    SoundFont) or clips packed as segments of data.clip_seconds (`shards pack --segment-seconds`) give views that do."""

    weight: float = 0.0
    mask_ratio: float = 0.6
    masking: str = "random"  # as mae.masking
    block_size: int = 2
    predictor_hidden_size: int = 128
    predictor_layers: int = 2
    predictor_heads: int = 4
    predictor_intermediate_size: int = 512
    ema_decay: float = 0.99
    ema_decay_end: float = 0.999

    def __post_init__(self) -> None:
        check_masking("teacher", self.masking, self.mask_ratio)
        if not 0 <= self.ema_decay <= self.ema_decay_end < 1:
            raise ValueError("teacher.ema_decay and teacher.ema_decay_end need 0 <= ema_decay <= ema_decay_end < 1; "
                             f"got {self.ema_decay} and {self.ema_decay_end}")


@dataclass
class ElectraConfig:
    """Corrupted-patch detection: the encoder sees every patch and says which ones are original/shuffled/replaced."""

    weight: float = 0.0
    corrupt_ratio: float = 0.15
    replace_fraction: float = 0.5  # of the corrupted patches: taken from another clip (the rest are shuffled)

    def __post_init__(self) -> None:
        if not 0 < self.corrupt_ratio < 1 or not 0 <= self.replace_fraction <= 1:
            raise ValueError("electra.corrupt_ratio must be in (0, 1) and electra.replace_fraction in [0, 1]")


@dataclass
class MetricConfig:
    """Clip-embedding losses: NT-Xent between two views, hierarchical-margin triplets for labelled clips.

    Being clip-level, it is the one objective that also trains overlapping patches (model.frequency_stride <
    patch_size), the geometry the scratch fine-tuning recipe uses; `patchout` then drops that fraction of each view's
    patch tokens at random (PaSST), as fine-tuning does: fewer tokens per step, and views that differ more."""

    weight: float = 0.0
    projection_size: int = 128
    temperature: float = 0.1
    ntxent_weight: float = 1.0
    triplet_weight: float = 1.0
    family_margin: float = 0.1  # negative shares only a family with the anchor (positive shares an instrument)
    different_margin: float = 0.3  # negative shares no family
    genre_margin: float = 0.05  # added when the negative's genre differs from the anchor's
    max_clips: int = 128  # labelled clips per step used to build triplets (bounds the O(M^3) search)
    max_triplets: int = 20000
    resize_crop: bool = False  # BYOL-A's random resize crop on each view, before SpecAugment
    spec_augment: bool = True  # SpecAugment on each view
    patchout: float = 0.0  # fraction of each view's patch tokens dropped at random; 0 keeps all

    def __post_init__(self) -> None:
        if not 0 <= self.patchout < 1:
            raise ValueError(f"metric.patchout is the fraction of patches dropped, in [0, 1); got {self.patchout}")


@dataclass
class ObjectivesConfig:
    mae: MAEConfig = field(default_factory=MAEConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    electra: ElectraConfig = field(default_factory=ElectraConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)

    def enabled(self) -> list[str]:
        return [name for name in OBJECTIVES if getattr(self, name).weight > 0]


OBJECTIVES = tuple(f.name for f in dataclasses.fields(ObjectivesConfig))  # mae, teacher, electra, metric


# ----------------------------------------------------------------------------------------------------
# MAE: masking, decoder, loss

def random_scores(batch: int, grid: tuple[int, int], device: torch.device) -> Tensor:
    """(B, N) i.i.d. scores: masking the highest ones is unstructured random masking."""
    return torch.rand(batch, grid[0] * grid[1], device=device)


def time_band_scores(batch: int, grid: tuple[int, int], device: torch.device) -> Tensor:
    """One score per time column (plus a tie-break), so whole time bands are masked first."""
    column = torch.rand(batch, 1, grid[1], device=device)
    return rearrange(column + 1e-3 * torch.rand(batch, *grid, device=device), "b f t -> b (f t)")


def frequency_band_scores(batch: int, grid: tuple[int, int], device: torch.device) -> Tensor:
    """One score per frequency row (plus a tie-break), so whole frequency bands are masked first."""
    row = torch.rand(batch, grid[0], 1, device=device)
    return rearrange(row + 1e-3 * torch.rand(batch, *grid, device=device), "b f t -> b (f t)")


def block_scores(batch: int, grid: tuple[int, int], device: torch.device, *, size: int = 2) -> Tensor:
    """One score per size x size block of patches (plus a tie-break), so square blocks are masked first."""
    coarse = torch.rand(batch, -(-grid[0] // size), -(-grid[1] // size), device=device)
    fine = coarse.repeat_interleave(size, dim=1).repeat_interleave(size, dim=2)[:, : grid[0], : grid[1]]
    return rearrange(fine + 1e-3 * torch.rand(batch, *grid, device=device), "b f t -> b (f t)")


def mask_from_scores(scores: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """Mask the round(ratio * N) highest-scoring patches of every clip.

    Returns keep (B, K) indices of the visible patches in token order, and masked (B, N) bool.
    """
    batch, patches = scores.shape
    num_masked = min(patches - 1, max(1, round(ratio * patches)))
    order = scores.argsort(dim=1, descending=True)
    keep = order[:, num_masked:].sort(dim=1).values
    masked = torch.ones_like(scores, dtype=torch.bool).scatter(1, keep, False)
    return keep, masked


def mask_patches(batch: int, grid: tuple[int, int], device: torch.device, *, config: MAEConfig | TeacherConfig,
                 whole_columns: bool = False) -> tuple[Tensor, Tensor]:
    """keep (B, K), masked (B, N) for the configured strategy ("mixed" draws one strategy per batch).

    `whole_columns` rounds time masking to whole time columns (patches overlapping in frequency need it: a partly
    hidden column shows its hidden patches through the rest)."""
    strategy = config.masking
    if strategy == "mixed":
        strategy = MASKINGS[int(torch.randint(len(MASKINGS), ()))]
    if strategy == "random":
        scores = random_scores(batch, grid, device)
    elif strategy == "time":
        scores = time_band_scores(batch, grid, device)
        if whole_columns:
            return mask_from_scores(scores, min(grid[1] - 1, max(1, round(config.mask_ratio * grid[1]))) / grid[1])
    elif strategy == "frequency":
        scores = frequency_band_scores(batch, grid, device)
    elif strategy == "block":
        scores = block_scores(batch, grid, device, size=config.block_size)
    else:
        raise ValueError(f"unknown masking {config.masking!r}; use one of {', '.join(MASKINGS)} or mixed")
    return mask_from_scores(scores, config.mask_ratio)


def masked_indices(masked: Tensor) -> Tensor:
    """masked (B, N) bool with the same count M masked in every clip -> (B, M) their indices in token order."""
    count = int(masked[0].sum())
    return masked.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :count]


@lru_cache(maxsize=16)
def _decoder_positions(grid: tuple[int, int], dim: int, device: torch.device) -> Tensor:
    """(1, N, dim) fixed 2D sin-cos positions of the decoder, made once per grid and device."""
    return rearrange(sincos_grid(grid[0], grid[1], dim), "f t d -> 1 (f t) d").to(device)


class MAEDecoder(nn.Module):
    """Visible tokens + mask tokens at fixed sin-cos positions -> a small transformer -> `output_size` values per patch
    (pixels for MAE, the teacher's representation for the teacher objective)."""

    no_weight_decay = ("mask_token",)  # read by pretrain.backbone.param_groups

    def __init__(self, *, encoder_size: int, output_size: int, hidden_size: int, layers: int, heads: int,
                 intermediate_size: int) -> None:
        super().__init__()
        blocks = BackboneConfig(hidden_size=hidden_size, num_layers=layers, num_heads=heads,
                                intermediate_size=intermediate_size, layer_norm_eps=1e-6)
        self.embed = nn.Linear(encoder_size, hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.blocks = nn.ModuleList(Block(blocks) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.head = nn.Linear(hidden_size, output_size)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, hidden: Tensor, keep: Tensor, grid: tuple[int, int], predict: Tensor | None = None) -> Tensor:
        """hidden (B, 2 + K, D) encoder output (cls, dist, visible), keep (B, K) -> (B, N, output_size), or only
        the patches at `predict` (B, M) indices: the loss needs the masked ones, so the head skips the rest."""
        x = self.embed(hidden)
        special, visible = x[:, :2], x[:, 2:]
        batch, _, width = x.shape
        full = self.mask_token.to(x.dtype).expand(batch, grid[0] * grid[1], width)
        full = full.scatter(1, repeat(keep, "b k -> b k d", d=width), visible)
        full = full + _decoder_positions(grid, width, x.device).to(x.dtype)
        x = torch.cat([special, full], dim=1)
        for block in self.blocks:
            x = block(x)
        x = x[:, 2:]
        if predict is not None:
            x = torch.gather(x, 1, repeat(predict, "b m -> b m d", d=width))
        return self.head(self.norm(x))


def normalise_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch to zero mean and unit variance (MAE's norm_pix_loss target)."""
    centred = patches - patches.mean(dim=-1, keepdim=True)
    var = centred.square().sum(dim=-1, keepdim=True) / (patches.shape[-1] - 1)  # unbiased, as MAE; faster than var()
    return centred * (var + eps).rsqrt()


def masked_patch_loss(prediction: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """Mean squared error over the masked patches only."""
    error = (prediction.float() - target.float()).square().mean(dim=-1)
    return (error * masked).sum() / masked.sum()


# ----------------------------------------------------------------------------------------------------
# EMA teacher


def ema_decay(progress: float, config: TeacherConfig) -> float:
    """The teacher's decay at `progress` (0 at the first step, 1 at the last): a cosine from ema_decay up to ema_decay_end."""
    rise = (1 - math.cos(math.pi * min(max(progress, 0.0), 1.0))) / 2
    return config.ema_decay + (config.ema_decay_end - config.ema_decay) * rise


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter."""
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1 - decay)


# ----------------------------------------------------------------------------------------------------
# ELECTRA-style detection

ORIGINAL, SHUFFLED, REPLACED = 0, 1, 2


def corrupt_patches(patches: Tensor, *, ratio: float, replace_fraction: float) -> tuple[Tensor, Tensor]:
    """Corrupt round(ratio * N) patches per clip: some moved to another position of the same clip, some taken
    from another clip of the batch. Returns the corrupted patches and labels (B, N) in {ORIGINAL, SHUFFLED, REPLACED}.
    """
    batch, count, values = patches.shape
    corrupted_count = max(2, round(ratio * count))
    replaced_count = round(corrupted_count * replace_fraction) if batch > 1 else 0
    shuffled_count = corrupted_count - replaced_count
    if shuffled_count == 1:  # one patch cannot be shuffled with itself
        shuffled_count, replaced_count = (2, replaced_count - 1) if replaced_count else (0, 1)
    chosen = torch.rand(batch, count, device=patches.device).argsort(dim=1)[:, : shuffled_count + replaced_count]
    shuffled, replaced = chosen[:, :shuffled_count], chosen[:, shuffled_count:]
    labels = torch.zeros(batch, count, dtype=torch.long, device=patches.device)
    labels = labels.scatter(1, shuffled, SHUFFLED).scatter(1, replaced, REPLACED)

    # Each shuffled position takes the patch of the next chosen position: a derangement, nothing stays put.
    sources = torch.gather(patches, 1, repeat(shuffled.roll(-1, dims=1), "b k -> b k v", v=values))
    corrupted = patches.scatter(1, repeat(shuffled, "b k -> b k v", v=values), sources)
    if replaced_count:
        donor_clip = (torch.arange(batch, device=patches.device) + torch.randint(1, batch, (batch,), device=patches.device)) % batch
        donor_position = torch.randint(count, (batch, replaced_count), device=patches.device)
        donors = patches[donor_clip[:, None], donor_position]
        corrupted = corrupted.scatter(1, repeat(replaced, "b k -> b k v", v=values), donors)
    return corrupted, labels


def balanced_cross_entropy(logits: Tensor, labels: Tensor, classes: int = 3) -> Tensor:
    """Mean over the classes present of each class's mean cross-entropy (corruptions are rare)."""
    flat = labels.flatten()
    per_patch = F.cross_entropy(rearrange(logits.float(), "b n c -> (b n) c"), flat, reduction="none")
    support = torch.bincount(flat, minlength=classes).float()
    totals = torch.zeros(classes, device=logits.device).index_add(0, flat, per_patch)
    return (totals / support.clamp_min(1)).sum() / (support > 0).sum()


def balanced_accuracy(logits: Tensor, labels: Tensor, classes: int = 3) -> Tensor:
    """Mean per-class recall over the classes present (0-d tensor); chance is 1 / number of classes present."""
    flat = labels.flatten()
    correct = (logits.argmax(dim=-1).flatten() == flat).float()
    support = torch.bincount(flat, minlength=classes).float()
    hits = torch.zeros(classes, device=logits.device).index_add(0, flat, correct)
    return (hits / support.clamp_min(1)).sum() / (support > 0).sum()


# ----------------------------------------------------------------------------------------------------
# Metric learning on clip embeddings


def gather_across_ranks(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0; the local slice keeps its gradient (negatives from all ranks).

    Each rank back-propagates through its own clips only; DDP's gradient averaging then sums the contributions.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def hierarchy_levels(targets: Tensor, families: Tensor) -> Tensor:
    """(M, M): 0 when two clips share an instrument, 1 when they share only a family, 2 otherwise."""
    share_instrument = (targets @ targets.T) > 0
    share_family = (families @ families.T) > 0
    return 2 - share_family.long() - share_instrument.long()


def hierarchical_triplets(
    levels: Tensor, genre: Tensor, *, config: MetricConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All (anchor, positive, negative) with the positive closer in the label hierarchy than the negative.

    The margin grows with the gap: margin(level) = 0, family_margin, different_margin for levels 0, 1, 2, and a
    triplet asks d(a, n) - d(a, p) >= margin(level(a, n)) - margin(level(a, p)) (+ genre_margin when the negative's
    genre differs from the anchor's and both are known). Returns index tensors a, p, n and the margins.
    """
    size = levels.shape[0]
    distinct = ~torch.eye(size, dtype=torch.bool, device=levels.device)
    valid = (levels[:, :, None] < levels[:, None, :]) & distinct[:, :, None] & distinct[:, None, :]
    anchor, positive, negative = valid.nonzero(as_tuple=True)
    if anchor.numel() > config.max_triplets:
        pick = torch.randperm(anchor.numel(), device=levels.device)[: config.max_triplets]
        anchor, positive, negative = anchor[pick], positive[pick], negative[pick]
    by_level = torch.tensor([0.0, config.family_margin, config.different_margin], device=levels.device)
    margins = by_level[levels[anchor, negative]] - by_level[levels[anchor, positive]]
    genre_differs = (genre[anchor] >= 0) & (genre[negative] >= 0) & (genre[anchor] != genre[negative])
    margins = margins + config.genre_margin * genre_differs.float()
    return anchor, positive, negative, margins


class MetricLosses(nn.Module):
    """pytorch-metric-learning losses on L2-normalised projections of the pooled clip embedding."""

    def __init__(self, *, config: MetricConfig) -> None:
        super().__init__()
        self.config = config
        from pytorch_metric_learning import losses  # here: its scipy.stats import takes seconds that other runs skip

        self.ntxent = losses.NTXentLoss(temperature=config.temperature)

    def forward(self, views: Tensor, batch: dict) -> dict[str, Tensor]:
        """views (V, B, P) projected embeddings of V >= 2 views of each local clip -> {"ntxent", "triplet"}."""
        config = self.config
        count, clips, _ = views.shape
        everything = gather_across_ranks(rearrange(views.float(), "v b p -> b v p"))  # (B_all, V, P)
        identities = torch.arange(everything.shape[0], device=views.device)
        ntxent = self.ntxent(rearrange(everything, "b v p -> (v b) p"), identities.repeat(count))

        labelled = gather_across_ranks(batch["labelled"].float()).bool()
        targets = gather_across_ranks(batch["targets"].float())[labelled]
        families = gather_across_ranks(batch["families"].float())[labelled]
        genre = gather_across_ranks(batch["genre"])[labelled]
        anchors = everything[labelled][:, 0]
        if anchors.shape[0] > config.max_clips:
            pick = torch.randperm(anchors.shape[0], device=views.device)[: config.max_clips]
            anchors, targets, families, genre = anchors[pick], targets[pick], families[pick], genre[pick]
        a, p, n, margins = hierarchical_triplets(hierarchy_levels(targets, families), genre, config=config)
        triplet = anchors.sum() * 0.0  # keeps the graph when there are no triplets this step
        if a.numel():
            from pytorch_metric_learning import losses, reducers

            for margin in margins.unique():
                chosen = margins == margin
                loss = losses.TripletMarginLoss(margin=float(margin), reducer=reducers.MeanReducer())
                term = loss(anchors, indices_tuple=(a[chosen], p[chosen], n[chosen]))
                triplet = triplet + term * chosen.float().mean()
        return {"ntxent": ntxent, "triplet": triplet}


# ----------------------------------------------------------------------------------------------------
# The pretraining module


def check_patches(backbone: BackboneConfig, objectives: ObjectivesConfig) -> None:
    """ValueError unless every enabled patch-level objective hides whole patches: non-overlapping ones, or, for MAE,
    patches overlapping only in frequency with whole time columns masked (a column's patches are hidden together)."""
    patch = backbone.patch_size
    if (backbone.frequency_stride, backbone.time_stride) == (patch, patch):
        return
    patchwise = [name for name in ("mae", "teacher", "electra") if getattr(objectives, name).weight > 0]
    columns = objectives.mae.masking == "time" and backbone.time_stride == patch
    if patchwise == ["mae"] and not columns:
        raise ValueError("objectives.mae on patches overlapping in frequency needs whole time columns masked "
                         "(overlapping patches show each masked one through its neighbours): set "
                         "objectives.mae.masking=time and model.time_stride to the patch size, or "
                         "model.frequency_stride to the patch size")
    if patchwise and patchwise != ["mae"]:
        verb = "needs" if len(patchwise) == 1 else "need"
        raise ValueError(f"objectives.{' and '.join(patchwise)} {verb} non-overlapping patches (overlapping ones "
                         "show each masked patch through its neighbours): set model.frequency_stride and "
                         "model.time_stride to the patch size, or train objectives.metric (or objectives.mae with "
                         "masking=time) alone")


class Pretrainer(AudioEncoder):
    """Waveforms -> log-mel -> backbone -> the enabled objectives; `forward(batch)` returns (loss, logs)."""

    def __init__(self, *, backbone: BackboneConfig | Backbone, objectives: ObjectivesConfig) -> None:
        """`backbone`: the config of a new one, or a trained one to go on pretraining (its objective heads start new)."""
        if not objectives.enabled():
            raise ValueError(f"no objective enabled; give one of objectives.{{{', '.join(OBJECTIVES)}}} a weight > 0")
        encoder = backbone if isinstance(backbone, Backbone) else Backbone(backbone)
        backbone = encoder.config
        check_patches(backbone, objectives)
        super().__init__(backbone=encoder)
        self.objectives = objectives
        patch_values = backbone.patch_size**2
        if objectives.mae.weight > 0:
            mae = objectives.mae
            self.decoder = MAEDecoder(encoder_size=backbone.hidden_size, output_size=patch_values,
                                      hidden_size=mae.decoder_hidden_size, layers=mae.decoder_layers,
                                      heads=mae.decoder_heads, intermediate_size=mae.decoder_intermediate_size)
        if objectives.teacher.weight > 0:
            teacher = objectives.teacher
            self.predictor = MAEDecoder(encoder_size=backbone.hidden_size, output_size=backbone.hidden_size,
                                        hidden_size=teacher.predictor_hidden_size, layers=teacher.predictor_layers,
                                        heads=teacher.predictor_heads,
                                        intermediate_size=teacher.predictor_intermediate_size)
            self.teacher = copy.deepcopy(self.backbone).requires_grad_(False)
            self.teacher_progress: float | None = None  # the step the teacher was last moved at (once per step)
        if objectives.electra.weight > 0:
            self.detector = nn.Linear(backbone.hidden_size, 3)
        if objectives.metric.weight > 0:
            self.projector = nn.Sequential(
                nn.Linear(backbone.hidden_size, backbone.hidden_size),
                nn.GELU(),
                nn.Linear(backbone.hidden_size, objectives.metric.projection_size),
            )
            self.metric = MetricLosses(config=objectives.metric)
            self.augment = SpecAugment()
            self.resize_crop = ResizeCrop()

    def features(self, audio: Tensor) -> Tensor:
        """(B, S) or (B, V, S) waveforms -> (B, V, frames, mels) log-mel features, cropped to whole patches."""
        views = audio.shape[1] if audio.dim() == 3 else 1
        features = super().features(rearrange(audio, "b v s -> (b v) s") if audio.dim() == 3 else audio)
        frames = self.backbone.grid(features.shape[1])[1] * self.backbone.config.patch_size
        return rearrange(features[:, :frames], "(b v) t f -> b v t f", v=views)

    def forward(self, batch: dict, *, progress: float | None = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The weighted sum of the enabled objectives, and each one's (detached) value for logging.

        `progress` (step / steps, from the trainer) moves the EMA teacher towards the student once per step, at the
        first forward of that step; None leaves the teacher as it is.
        """
        features = self.features(batch["audio"])
        total, logs = features.new_zeros(()), {}
        if self.objectives.mae.weight > 0:
            mae = self.mae(features[:, 0])
            total = total + self.objectives.mae.weight * mae["loss"]
            logs["mae"] = mae["loss"].detach()
        if self.objectives.teacher.weight > 0:
            if progress is not None:
                logs["teacher_ema_decay"] = decay = ema_decay(progress, self.objectives.teacher)
                if progress != self.teacher_progress:
                    ema_update(self.teacher, self.backbone, decay)
                    self.teacher_progress = progress
            teacher = self.teach(features[:, 0], features[:, -1])
            total = total + self.objectives.teacher.weight * teacher["loss"]
            logs["teacher"] = teacher["loss"].detach()
            logs["teacher_target_std"] = teacher["target_std"]
        if self.objectives.electra.weight > 0:
            electra = self.electra(features[:, 0])
            total = total + self.objectives.electra.weight * electra["loss"]
            logs["electra"] = electra["loss"].detach()
            logs["electra_balanced_accuracy"] = balanced_accuracy(electra["logits"].detach(), electra["labels"])
        if self.objectives.metric.weight > 0:
            metric = self.metric_terms(features, batch)
            config = self.objectives.metric
            loss = config.ntxent_weight * metric["ntxent"] + config.triplet_weight * metric["triplet"]
            total = total + config.weight * loss
            logs.update(metric=loss.detach(), metric_ntxent=metric["ntxent"].detach(),
                        metric_triplet=metric["triplet"].detach())
        return total, logs

    def mae(self, features: Tensor, *, every_patch: bool = False) -> dict[str, Tensor]:
        """features (B, T, F) -> loss, masked (B, N) and target (B, N, P); prediction (B, M, P) of the masked
        patches in token order, or (B, N, P) of every patch with `every_patch` (for pictures)."""
        grid = self.backbone.grid(features.shape[1])
        overlapping = self.backbone.config.frequency_stride < self.backbone.config.patch_size
        keep, masked = mask_patches(features.shape[0], grid, features.device, config=self.objectives.mae,
                                    whole_columns=overlapping)
        encoded = self.backbone(features, keep=keep)
        target = self.backbone.patch_embed.patches(features)  # (B, N, P), overlapping or not
        if self.objectives.mae.norm_pix_loss:
            target = normalise_patches(target)
        if every_patch:
            prediction = self.decoder(encoded.hidden, keep, grid)
            loss = masked_patch_loss(prediction, target, masked)
        else:
            hidden_ids = masked_indices(masked)
            prediction = self.decoder(encoded.hidden, keep, grid, predict=hidden_ids)
            chosen = torch.gather(target, 1, repeat(hidden_ids, "b m -> b m p", p=target.shape[-1]))
            loss = (prediction.float() - chosen.float()).square().mean()
        return {"loss": loss, "prediction": prediction, "target": target, "masked": masked}

    def teach(self, features: Tensor, teacher_features: Tensor | None = None) -> dict[str, Tensor]:
        """features (B, T, F) for the student, teacher_features (B, T, F) for the teacher (default: the same) ->
        loss (mean squared error of the predicted masked tokens against the teacher's, layer-normalised), prediction
        and target (B, M, D), masked (B, N), and target_std: the targets' spread over tokens, averaged over channels
        (near 0 means the representations collapsed to a constant)."""
        grid = self.backbone.grid(features.shape[1])
        keep, masked = mask_patches(features.shape[0], grid, features.device, config=self.objectives.teacher)
        hidden_ids = masked_indices(masked)
        prediction = self.predictor(self.backbone(features, keep=keep).hidden, keep, grid, predict=hidden_ids)
        with torch.no_grad():
            tokens = self.teacher(features if teacher_features is None else teacher_features).tokens.float()
            tokens = F.layer_norm(tokens, tokens.shape[-1:])
            target = torch.gather(tokens, 1, repeat(hidden_ids, "b m -> b m d", d=tokens.shape[-1]))
        loss = (prediction.float() - target).square().mean()
        return {"loss": loss, "prediction": prediction, "target": target, "masked": masked,
                "target_std": target.flatten(0, 1).std(dim=0).mean()}

    def electra(self, features: Tensor) -> dict[str, Tensor]:
        """features (B, T, F) -> loss, logits (B, N, 3), labels (B, N), corrupted features (B, T, F)."""
        patch = self.backbone.config.patch_size
        grid = self.backbone.grid(features.shape[1])
        config = self.objectives.electra
        corrupted, labels = corrupt_patches(
            patchify(features, patch), ratio=config.corrupt_ratio, replace_fraction=config.replace_fraction
        )
        corrupted = unpatchify(corrupted, grid, patch)
        logits = self.detector(self.backbone(corrupted).tokens)
        return {"loss": balanced_cross_entropy(logits, labels), "logits": logits, "labels": labels,
                "corrupted": corrupted}

    def metric_terms(self, features: Tensor, batch: dict) -> dict[str, Tensor]:
        """features (B, V, T, F); one view is augmented twice when the loader gave only one."""
        if features.shape[1] == 1:
            features = features.expand(-1, 2, -1, -1)
        views = rearrange(features, "b v t f -> (v b) t f")
        if self.objectives.metric.resize_crop:
            views = self.resize_crop(views)
        if self.objectives.metric.spec_augment:
            views = self.augment(views)
        keep = None
        if self.training and self.objectives.metric.patchout:
            scores = random_scores(views.shape[0], self.backbone.grid(views.shape[1]), views.device)
            keep, _ = mask_from_scores(scores, self.objectives.metric.patchout)
        projected = F.normalize(self.projector(self.backbone(views, keep=keep).embedding).float(), dim=-1)
        return self.metric(rearrange(projected, "(v b) p -> v b p", v=features.shape[1]), batch)
