"""Class-conditional DiT denoisers: ContentDiT for the content frame, MotionDiT for the motion latent."""

import math
from functools import partial
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from models.layers import Attention, Mlp, modulate, sincos_2d

__all__ = [
    "TimestepEmbedder",
    "LabelEmbedder",
    "PatchEmbed",
    "DiTBlock",
    "FinalLayer",
    "ContentDiT",
    "MotionDiT",
    "ContentDiT_models",
    "MotionDiT_models",
    "DIT_SIZES",
    "validate_model_name",
    "build_dit",
]

STAGE_NAMES = ("content", "motion")


def _token_grid(size: Sequence[int], patch_size: int, what: str) -> Tuple[int, int]:
    """(rows, cols) of the patch grid of a (H, W) input; one-line ValueError if it does not tile."""
    if len(size) != 2:
        raise ValueError(f"{what} size must be (height, width), got {tuple(size)}")
    height, width = int(size[0]), int(size[1])
    if patch_size < 1 or height % patch_size != 0 or width % patch_size != 0:
        raise ValueError(f"{what} size {height}x{width} is not divisible by patch size {patch_size}")
    return height // patch_size, width // patch_size


def _fixed_position_table(hidden_size: int, grid: Tuple[int, int]) -> torch.Tensor:
    return sincos_2d(hidden_size, grid[0], grid[1]).unsqueeze(0)  # (1, N, hidden), on the default device


class TimestepEmbedder(nn.Module):
    """Diffusion step (B,) -> (B, hidden): sinusoidal frequency features followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def frequency_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) steps, possibly fractional (respaced samplers) -> (B, dim) cos/sin features."""
        half = dim // 2
        exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
        frequencies = torch.exp(-math.log(max_period) * exponents)
        angles = t.float().reshape(-1, 1) * frequencies.reshape(1, -1)
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
        if dim % 2 == 1:
            features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=1)
        return features

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.frequency_features(t, self.frequency_embedding_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def _drop_to_null(embedder: nn.Module, y: torch.Tensor, force_drop_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """y (B, ...) with rows replaced by embedder.null_like(y): where force_drop_ids == 1, else each with probability
    embedder.dropout_prob in training (classifier-free guidance's condition dropout)."""
    if force_drop_ids is not None:
        drop = force_drop_ids.to(y.device) == 1
    elif embedder.training and embedder.dropout_prob > 0:
        drop = torch.rand(y.shape[0], device=y.device) < embedder.dropout_prob
    else:
        return y
    return torch.where(drop.view(-1, *(1,) * (y.dim() - 1)), embedder.null_like(y), y)


class LabelEmbedder(nn.Module):
    """Class label (B,) -> (B, hidden), with index `num_classes` as the null ("unconditional") label.

    The null row always exists, even with `dropout_prob == 0`, so that guidance code can always ask
    for it; it is only trained when labels are dropped during training.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replace labels by the null label: where force_drop_ids == 1, else at random in training."""
        return _drop_to_null(self, labels, force_drop_ids)

    def null_like(self, labels: torch.Tensor) -> torch.Tensor:
        """The null condition for every row of `labels` (B,): what guidance's unconditional half gets."""
        return torch.full_like(labels, self.null_label)

    def forward(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.embedding_table(self.token_drop(labels, force_drop_ids))


class TextEmbedder(nn.Module):
    """Text tokens (B, L, D) of a frozen text encoder (models.text_encoder) -> the denoiser's text condition, with
    the empty prompt's tokens as the null condition: captions are replaced by it at random in training (rate
    `dropout_prob`) and guidance's unconditional half gets it.

    `null_tokens` (L, D) is a buffer saved with the model: the run that trains it fills it from its encoder, so a
    checkpoint guides with the empty prompt of the encoder it learned. Without `hidden_size` the tokens come out
    as they are (a UNet's cross-attention context); with it they are pooled into one (B, hidden_size) vector for
    adaLN: the tokens minus the empty prompt's, `heads` attention weightings over them (scores linear in each
    token) and an MLP. Pooling over the tokens rather than taking CLIP's end-of-text state lets the model learn
    which tokens matter.
    """

    def __init__(self, text_shape: Sequence[int], dropout_prob: float, hidden_size: Optional[int] = None,
                 heads: int = 4):
        super().__init__()
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob (the caption dropout) must be in [0, 1), got {dropout_prob}")
        length, dim = (int(v) for v in text_shape)
        self.text_shape = (length, dim)
        self.dropout_prob = dropout_prob
        self.register_buffer("null_tokens", torch.zeros(length, dim))
        self.pool = None
        if hidden_size is not None:
            self.pool = nn.ModuleDict({
                "scores": nn.Linear(dim, heads),
                "mlp": nn.Sequential(nn.Linear(heads * dim, hidden_size), nn.SiLU(),
                                     nn.Linear(hidden_size, hidden_size)),
            })

    def null_like(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.null_tokens.to(tokens.dtype).expand_as(tokens)

    def token_drop(self, tokens: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replace captions by the empty prompt: where force_drop_ids == 1, else at random in training."""
        if tuple(tokens.shape[1:]) != self.text_shape:
            raise ValueError(f"text tokens must have shape (B, {self.text_shape[0]}, {self.text_shape[1]}), "
                             f"got {tuple(tokens.shape)}")
        return _drop_to_null(self, tokens, force_drop_ids)

    def forward(self, tokens: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        tokens = self.token_drop(tokens, force_drop_ids)
        if self.pool is None:
            return tokens
        # What the caption changes against the empty prompt, position by position: the states every prompt shares
        # (a random or a real CLIP's are mostly alike, cosine ~0.99 between captions) cancel, and the null
        # condition pools to exactly zero.
        tokens = tokens - self.null_tokens.to(tokens.dtype)
        weights = self.pool["scores"](tokens).softmax(dim=1)  # (B, L, heads): each head's weighting of the tokens
        pooled = torch.einsum("blh,bld->bhd", weights, tokens).flatten(1)  # (B, heads * D)
        return self.pool["mlp"](pooled)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p)*(W/p), hidden) row-major patch tokens via a strided convolution."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DiTBlock(nn.Module):
    """Transformer block whose two sub-layers are modulated and gated by the conditioning (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=partial(nn.GELU, approximate="tanh"),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, hidden) tokens, c (B, hidden) conditioning -> (B, N, hidden)."""
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_attn.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_attn, scale_attn))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm + linear map of each token to its patch of output values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def init_dit_weights(model: nn.Module) -> None:
    """DiT initialisation of a model with t_embedder, y_embedder, blocks (adaLN) and final_layer; call it once all
    its modules exist (the DiTs here and the video DiT baseline in benchmarks/ share it)."""

    def xavier_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    model.apply(xavier_linear)
    for module in model.modules():
        if isinstance(module, PatchEmbed):
            # Treat the conv as the linear map over a flattened patch that it is.
            nn.init.xavier_uniform_(module.proj.weight.view(module.proj.weight.shape[0], -1))
            nn.init.zeros_(module.proj.bias)
    if isinstance(model.y_embedder, LabelEmbedder):
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    elif model.y_embedder.pool is not None:
        nn.init.zeros_(model.y_embedder.pool["scores"].weight)  # pooling starts as the mean over the tokens
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    # adaLN-Zero: every block starts as the identity and the output starts at zero.
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


class _DiTBackbone(nn.Module):
    """What both denoisers share: patchified main input, t/y conditioning, adaLN-Zero blocks, unpatchify.

    Subclasses decide which extra tokens join the main-input tokens in `forward`.
    """

    def __init__(
        self,
        input_size: Sequence[int],
        in_channels: int,
        patch_size: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        num_classes: int,
        class_dropout_prob: float,
        learn_sigma: bool,
        grad_checkpointing: bool,
        text_shape: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        # hidden_size % 4 (2-D sin-cos positions) and % num_heads are checked where they matter, in models.layers.
        self.grid_size = _token_grid(input_size, patch_size, "input")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        # Fixed (not learned) positions, rebuilt from the config: kept out of the state dict.
        self.register_buffer("pos_embed", _fixed_position_table(hidden_size, self.grid_size), persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Classes, or captions (text_shape (L, D) of the text encoder's tokens) pooled into the same adaLN vector.
        self.y_embedder = (LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if text_shape is None
                           else TextEmbedder(text_shape, class_dropout_prob, hidden_size))
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def _initialize_weights(self) -> None:
        init_dit_weights(self)

    def _check_input(self, x: torch.Tensor, name: str, channels: int, size: Tuple[int, int]) -> None:
        # The fixed position table only fits one grid, so a wrong shape must fail loudly here.
        expected = (channels, size[0], size[1])
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{name} must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(x.shape)}")

    def _conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) steps and (B,) labels or (B, L, D) text tokens -> (B, hidden) vector that drives every adaLN layer."""
        return self.t_embedder(t) + self.y_embedder(y)

    def _run_blocks(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_checkpoint:
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        return tokens

    def _decode(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Main-input tokens (B, gh*gw, hidden) -> (B, out_channels, gh*p, gw*p)."""
        patches = self.final_layer(tokens, c)  # (B, gh*gw, p*p*out_channels)
        return rearrange(
            patches,
            "b (gh gw) (p q c) -> b c (gh p) (gw q)",
            gh=self.grid_size[0],
            gw=self.grid_size[1],
            p=self.patch_size,
            q=self.patch_size,
        )


class ContentDiT(_DiTBackbone):
    """p(z_c | y): DiT over the content frame z_c (B, C, H, W), conditioned on a class or a caption's tokens.

    With self_condition the model also reads an estimate of the clean frame, x_sc (B, C, H, W), stacked on the
    noisy one along the channels (self-conditioning, Chen et al. 2022): the diffusion's training and samplers feed
    it the model's own previous estimate (GaussianDiffusion.self_conditioned), zeros when there is none.
    """

    def __init__(
        self,
        input_size: Sequence[int] = (64, 64),
        in_channels: int = 3,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 101,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        grad_checkpointing: bool = False,
        text_shape: Optional[Sequence[int]] = None,
        self_condition: bool = False,
    ):
        super().__init__(
            input_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio,
            num_classes, class_dropout_prob, learn_sigma, grad_checkpointing, text_shape,
        )
        self.self_condition = bool(self_condition)
        if self.self_condition:
            self.x_embedder = PatchEmbed(2 * in_channels, hidden_size, patch_size)
        self._initialize_weights()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                x_sc: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C, H, W) noisy content frame, t (B,), y (B,) labels or (B, L, D) text, x_sc (B, C, H, W) the
        estimate of the clean frame a self-conditioned model reads (default zeros) -> (B, 2C or C, H, W)."""
        self._check_input(x, "content frame x", self.in_channels, self.input_size)
        if self.self_condition:
            if x_sc is not None:
                self._check_input(x_sc, "self-conditioning estimate x_sc", self.in_channels, self.input_size)
            x = torch.cat([x, torch.zeros_like(x) if x_sc is None else x_sc.to(x.dtype)], dim=1)
        elif x_sc is not None:
            raise ValueError("x_sc given to a ContentDiT built without self_condition")
        tokens = self.x_embedder(x) + self.pos_embed  # (B, N, hidden)
        c = self._conditioning(t, y)
        return self._decode(self._run_blocks(tokens, c), c)


class MotionDiT(_DiTBackbone):
    """p(z_m | z_c, y): DiT over the motion latent z_m (B, D, T, H'+W') seen as a T x (H'+W') image.

    The clean content frame z_c joins as extra tokens (own patch size `key_patch_size`, own 2-D
    positions); a learned token-type vector tells the two kinds apart, because both position tables
    start at (0, 0) and would otherwise give the first tokens of each kind the same embedding.
    Only the z_m tokens are decoded.
    """

    def __init__(
        self,
        input_size: Sequence[int] = (16, 64),
        in_channels: int = 8,
        patch_size: int = 2,
        hidden_size: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 101,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        content_channels: int = 3,
        content_size: Sequence[int] = (64, 64),
        key_patch_size: int = 4,
        grad_checkpointing: bool = False,
        text_shape: Optional[Sequence[int]] = None,
    ):
        super().__init__(
            input_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio,
            num_classes, class_dropout_prob, learn_sigma, grad_checkpointing, text_shape,
        )
        self.content_channels = content_channels
        self.content_grid_size = _token_grid(content_size, key_patch_size, "content frame")
        self.content_size = (int(content_size[0]), int(content_size[1]))
        self.key_patch_size = key_patch_size
        self.content_embedder = PatchEmbed(content_channels, hidden_size, key_patch_size)
        self.register_buffer(
            "content_pos_embed", _fixed_position_table(hidden_size, self.content_grid_size), persistent=False
        )
        self.token_type_embed = nn.Parameter(torch.zeros(2, hidden_size))  # row 0: z_m tokens, row 1: z_c tokens
        self._initialize_weights()
        nn.init.normal_(self.token_type_embed, std=0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """x (B, D, T, H'+W') noisy z_m, t (B,), y (B,) labels or (B, L, D) text, content (B, C, H, W) z_c ->
        (B, 2D or D, T, H'+W')."""
        self._check_input(x, "motion latent x", self.in_channels, self.input_size)
        self._check_input(content, "content frame", self.content_channels, self.content_size)
        # (B, Nm, hidden) motion tokens and (B, Nc, hidden) content tokens
        motion_tokens = self.x_embedder(x) + self.pos_embed + self.token_type_embed[0]
        content_tokens = self.content_embedder(content) + self.content_pos_embed + self.token_type_embed[1]
        num_motion_tokens = motion_tokens.shape[1]
        tokens = torch.cat([motion_tokens, content_tokens], dim=1)
        c = self._conditioning(t, y)
        tokens = self._run_blocks(tokens, c)
        return self._decode(tokens[:, :num_motion_tokens], c)


# name letter -> (hidden_size, depth, num_heads); T is a CPU-sized variant for tests and demos.
DIT_SIZES: Dict[str, Tuple[int, int, int]] = {
    "T": (128, 4, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
_PATCH_SIZES: Dict[str, Tuple[int, ...]] = {
    "T": (2, 4),
    "S": (2, 4, 8),
    "B": (2, 4, 8),
    "L": (2, 4, 8),
    "XL": (2, 4, 8),
}


def _registry_entry(model_class: type, size: str, patch_size: int) -> Callable[..., nn.Module]:
    hidden_size, depth, num_heads = DIT_SIZES[size]

    def build(**kwargs) -> nn.Module:
        # Passing hidden_size/depth/num_heads/patch_size again is a TypeError, as the name fixes them.
        return model_class(hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=patch_size, **kwargs)

    build.__name__ = f"{model_class.__name__}_{size}_{patch_size}"
    return build


def _registry(model_class: type) -> Dict[str, Callable[..., nn.Module]]:
    return {
        f"{model_class.__name__}-{size}/{patch_size}": _registry_entry(model_class, size, patch_size)
        for size, patch_sizes in _PATCH_SIZES.items()
        for patch_size in patch_sizes
    }


ContentDiT_models: Dict[str, Callable[..., nn.Module]] = _registry(ContentDiT)
MotionDiT_models: Dict[str, Callable[..., nn.Module]] = _registry(MotionDiT)
_REGISTRIES = {"content": ContentDiT_models, "motion": MotionDiT_models}


def validate_model_name(stage: str, name: str) -> str:
    """Return `name` if it is in the registry of `stage` ("content" | "motion"), else one-line ValueError."""
    if stage not in _REGISTRIES:
        raise ValueError(f"stage {stage!r} has no DiT registry; expected one of {list(STAGE_NAMES)}")
    registry = _REGISTRIES[stage]
    if name not in registry:
        raise ValueError(f"model.name {name!r} is not a {stage} model; valid names: {', '.join(registry)}")
    return name


def build_dit(
    stage: str,
    model_cfg,
    num_classes: int,
    ae_content_shape: Sequence[int],
    ae_motion_shape: Sequence[int],
    text_shape: Optional[Sequence[int]] = None,
) -> _DiTBackbone:
    """Denoiser for `stage` from a DiTModelConfig and the autoencoder's latent shapes.

    ae_content_shape is (C, H, W) of z_c; ae_motion_shape is (D, T, H'+W') of z_m; text_shape (L, D) of a text
    encoder's tokens makes it caption-conditioned instead of class-conditioned.
    """
    validate_model_name(stage, model_cfg.name)
    content_channels, content_height, content_width = (int(v) for v in ae_content_shape)
    common = dict(
        num_classes=int(num_classes),
        class_dropout_prob=float(model_cfg.class_dropout_prob),
        learn_sigma=bool(model_cfg.learn_sigma),
        grad_checkpointing=bool(model_cfg.grad_checkpointing),
        text_shape=text_shape,
    )
    if stage == "content":
        return ContentDiT_models[model_cfg.name](
            input_size=(content_height, content_width), in_channels=content_channels,
            self_condition=bool(model_cfg.self_condition), **common
        )
    motion_dim, num_frames, motion_length = (int(v) for v in ae_motion_shape)
    return MotionDiT_models[model_cfg.name](
        input_size=(num_frames, motion_length),
        in_channels=motion_dim,
        content_channels=content_channels,
        content_size=(content_height, content_width),
        key_patch_size=int(model_cfg.key_patch_size),
        **common,
    )
