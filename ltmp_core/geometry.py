"""The token geometry of a timm ViT: what the FLOP model and the search spaces need to know.

A :class:`ViTGeometry` is read from a model once (:func:`ViTGeometry.from_model`) and travels with
every plan, so that a plan's cost can be computed without the model or its weights.

It describes the model at its full width: a model whose heads or MLP units
:func:`ltmp_core.prune_width` cut carries the geometry it was cut from in its :class:`ModelState`
(FLOPs ratios stay ratios of the unreduced model), and :func:`block_widths` reads what each block has
now. :func:`ltmp_core.remove_plan` drops that state: the model is from then on a stock timm model of
its own, narrower widths.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Mapping

from .errors import LTMPError

if TYPE_CHECKING:  # a geometry reads and writes JSON without torch; reading one from a model needs it
    import torch.nn as nn

__all__ = ["ViTGeometry", "SUPPORTED_MODELS", "check_model", "block_widths", "STATE", "ModelState", "model_state",
           "is_cut_from"]

#: The one attribute in which ltmp_core keeps what it knows about a model it cut or patched (:class:`ModelState`).
STATE = "_ltmp"


def _linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``module``."""
    import torch.nn as nn

    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _attn_macs(attn: nn.Module) -> int:
    """Multiply-accumulates per token of the attention's linears (a relative-position MLP inside it
    works on the window's coordinates, not on the tokens: :func:`_relpos_mlp_macs`)."""
    rel_pos = getattr(attn, "rel_pos", None)
    return _linear_macs(attn) - (_linear_macs(rel_pos) if rel_pos is not None else 0)


def _relpos_mlp_macs(model: nn.Module) -> int:
    """MACs of the relative-position MLPs (``RelPosMlp``: a small MLP over the log coordinates of the
    window, once per block and forward pass): work that does not grow with the tokens of an image."""
    total = 0
    for module in model.modules():
        coords = getattr(module, "rel_coords_log", None)
        if coords is not None and hasattr(module, "mlp"):
            total += _linear_macs(module.mlp) * (coords.numel() // coords.shape[-1])
    return total


def block_widths(model: nn.Module) -> list[tuple[int, int]]:
    """``(attention heads, MLP hidden units)`` of every block of a timm ViT as it is now.

    The hidden units are the first MLP linear's outputs (what :func:`ltmp_core.prune_width` cuts).
    """
    import torch.nn as nn

    out = []
    for block in model.blocks:
        fc1 = next(m for m in block.mlp.modules() if isinstance(m, nn.Linear))
        out.append((int(block.attn.num_heads), int(fc1.out_features)))
    return out


def _families() -> dict[type, tuple[tuple[type, ...], tuple[type, ...], str]]:
    """timm model class -> (block classes, attention classes, what it is) that ltmp_core patches exactly."""
    from timm.layers.attention import AttentionRope
    from timm.models.beit import Attention as BeitAttention
    from timm.models.beit import Beit
    from timm.models.beit import Block as BeitBlock
    from timm.models.eva import Eva, EvaAttention, EvaBlock
    from timm.models.vision_transformer import Attention, Block, VisionTransformer
    from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, VisionTransformerRelPos

    return {
        VisionTransformer: ((Block,), (Attention,), "ViT, DeiT, DeiT-3, DINOv2, CLIP, SigLIP, register ViTs"),
        Eva: ((EvaBlock,), (EvaAttention, AttentionRope), "EVA-02, vit_*_rope_*, DINOv3, PE-core (rotary embeddings)"),
        Beit: ((BeitBlock,), (BeitAttention,), "BEiT, BEiT v2 (relative position bias)"),
        VisionTransformerRelPos: ((RelPosBlock,), (RelPosAttention,), "vit_relpos_* (relative position bias)"),
    }


#: What :func:`check_model` accepts, in one line per family (``ltmp_core.SUPPORTED_MODELS``).
SUPPORTED_MODELS = (
    "timm VisionTransformer models (deit_*, deit3_*, vit_*: ViT, DINOv2, CLIP, SigLIP with its attention-pool head, "
    "FlexiViT, register-token and qk_norm ViTs), Eva (eva02_*, vit_*_rope_*, DINOv3, PE-core: rotary positions, "
    "SwiGLU MLPs), Beit (beit_*, beitv2_*) and VisionTransformerRelPos (vit_relpos_*, vit_srelpos_*: relative "
    "position bias), built from their pre-norm blocks; dynamic_img_size models at any size they take"
)


def _family(model: nn.Module) -> tuple[tuple[type, ...], tuple[type, ...], str] | None:
    for cls, family in _families().items():
        if isinstance(model, cls):
            return family
    return None


def check_model(model: nn.Module) -> None:
    """Raise :class:`LTMPError` unless ``model`` is a timm ViT that ltmp_core can patch exactly.

    Supported (:data:`SUPPORTED_MODELS`): ``timm.models.vision_transformer.VisionTransformer`` and its
    subclasses that keep its block structure (DeiT with a distillation token, DeiT-3, register tokens,
    ``qk_norm``, LayerScale, class-token or average pooling), built from timm's own pre-norm ``Block``
    and ``Attention`` with a Linear MLP; timm's ``Eva`` (rotary position embeddings) built from its
    pre-norm ``EvaBlock`` with ``EvaAttention`` or ``AttentionRope``; ``Beit`` and
    ``VisionTransformerRelPos`` (relative position bias) from their pre-norm blocks.
    """
    import torch.nn as nn

    family = _family(model)
    if family is None:
        raise LTMPError(
            f"model: {type(model).__name__} is not a timm VisionTransformer, Eva, Beit or VisionTransformerRelPos "
            "(ltmp_core.SUPPORTED_MODELS says what ltmp_core patches)"
        )
    blocks, attentions, _ = family
    pool_head = getattr(model, "attn_pool", None)
    if pool_head is not None:
        from timm.layers import AttentionPoolLatent

        if type(pool_head) is not AttentionPoolLatent or pool_head.pos_embed is not None:
            raise LTMPError(f"model: attention pool {type(pool_head).__name__} is not supported; ltmp_core pools "
                            "reduced tokens with timm's AttentionPoolLatent (global_pool='map') without position "
                            "embedding")
    pool = getattr(model, "global_pool", "token")
    if pool not in ("token", "avg", "max", "avgmax", "", "map"):
        raise LTMPError(f"model: global_pool={pool!r} is not supported")
    from timm.layers import PatchEmbed

    if not isinstance(model.patch_embed, PatchEmbed):  # a hybrid stem (a CNN, then a 1x1 projection)
        raise LTMPError(f"model: patch embedding {type(model.patch_embed).__name__} is not timm's PatchEmbed; "
                        "hybrid ViT stems are not supported")
    if not isinstance(model.patch_embed.proj, nn.Conv2d):
        raise LTMPError(
            f"model: patch embedding {type(model.patch_embed.proj).__name__} is not a convolution; "
            "hybrid ViT stems are not supported"
        )
    if len(model.blocks) == 0:
        raise LTMPError("model: has no transformer blocks")
    names = "/".join(c.__name__ for c in blocks)
    for i, block in enumerate(model.blocks):
        # A patched block (ltmp_core.patch.LTMPBlock, ...) names the timm class it stands in for.
        if getattr(type(block), "_ltmp_base", type(block)) not in blocks:
            raise LTMPError(
                f"model.blocks[{i}]: {type(block).__name__} is not supported; only timm's pre-norm "
                f"{names} (attention, then MLP) can be patched"
            )
        if type(block.attn) not in attentions:
            raise LTMPError(
                f"model.blocks[{i}].attn: {type(block.attn).__name__} is not supported; only "
                f"{'/'.join(c.__name__ for c in attentions)} can be patched"
            )
        if _linear_macs(block.mlp) == 0:
            raise LTMPError(f"model.blocks[{i}].mlp: {type(block.mlp).__name__} has no Linear layers")


@dataclass(frozen=True)
class ViTGeometry:
    """Token geometry and per-token costs of a ViT.

    Costs are multiply-accumulates (MACs), the unit papers call "FLOPs" (DeiT-S = 4.6 G).

    Attributes:
        depth: Number of transformer blocks.
        embed_dim: Width of the residual stream.
        num_heads: Attention heads per block.
        head_dim: Width of one head; the similarity metric of the reducers has this width.
        mlp_hidden: Hidden width of the MLP (informative; costs use ``mlp_macs_per_token``).
        num_patches: Patch tokens of one image at the model's input size.
        num_prefix_tokens: Class, distillation and register tokens; never reduced.
        num_classes: Classifier outputs.
        patch_size: Height and width of one patch in pixels.
        img_size: Height and width of the input image in pixels.
        attn_macs_per_token: MACs of the attention's linear layers (qkv, proj, gate) per token.
        mlp_macs_per_token: MACs of the MLP's linear layers per token.
        embed_macs: MACs of the patch embedding for one image.
        head_macs: MACs of the classifier head(s) for one image, and of other work that does not grow
            with the tokens: an attention-pool head's latent query, output projection and MLP; the
            relative-position MLPs of ``vit_relpos_*`` models.
        pool_macs_per_token: MACs of an attention-pool head (``global_pool='map'``) per token it pools:
            its key-value projection and the latent queries' attention over the token; 0 without one.
        pool_skips_prefix: 1 when the attention pool leaves the prefix tokens out (timm's
            ``VisionTransformer`` without ``pool_include_prefix``), else 0.
    """

    depth: int
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_patches: int
    num_prefix_tokens: int
    num_classes: int
    patch_size: tuple[int, int]
    img_size: tuple[int, int]
    attn_macs_per_token: int
    mlp_macs_per_token: int
    embed_macs: int
    head_macs: int
    pool_macs_per_token: int = 0
    pool_skips_prefix: int = 0

    @property
    def attn_dim(self) -> int:
        """Width of queries, keys and values over all heads."""
        return self.num_heads * self.head_dim

    @property
    def num_tokens(self) -> int:
        """Tokens entering the first block: prefix plus patch tokens."""
        return self.num_patches + self.num_prefix_tokens

    @classmethod
    def from_model(cls, model: nn.Module) -> "ViTGeometry":
        """Read the geometry of a supported timm ViT (see :func:`check_model`).

        For a model whose width :func:`ltmp_core.prune_width` cut, the geometry of the model before the
        cut (every block's width now is at most that), as long as the model carries its
        :class:`ModelState`; after :func:`ltmp_core.remove_plan`, the geometry it has now.

        Raises:
            LTMPError: the model is not supported, or its blocks differ in width and it carries no
                record of the width they were cut from.
        """
        check_model(model)
        state = model_state(model)
        if state is not None and state.cut_from is not None:
            full = state.cut_from
            widths = block_widths(model)
            if len(widths) != full.depth or any(h > full.num_heads or m > full.mlp_hidden for h, m in widths):
                raise LTMPError("model: its blocks no longer fit the geometry its width was cut from")
            return full
        block = model.blocks[0]
        for i, other in enumerate(model.blocks):
            if _attn_macs(other.attn) != _attn_macs(block.attn) or _linear_macs(other.mlp) != _linear_macs(block.mlp):
                raise LTMPError(
                    f"model.blocks[{i}]: the blocks differ in width, which no one geometry describes; the geometry "
                    "ltmp_core.prune_width cut them from stays with the model until ltmp_core.remove_plan, and "
                    "ltmp_core.apply_plan(model, plan) takes it from the plan they were cut for")
        return cls._read(model)

    @classmethod
    def _read(cls, model: nn.Module) -> "ViTGeometry":
        """The geometry of ``model`` with the widths of its first block, unchecked."""
        import torch.nn as nn

        block = model.blocks[0]
        attn = block.attn
        pe = model.patch_embed
        conv: nn.Conv2d = pe.proj
        grid = tuple(int(g) for g in pe.grid_size)
        num_patches = grid[0] * grid[1]
        kh, kw = conv.kernel_size
        embed_macs = num_patches * (conv.in_channels // conv.groups) * kh * kw * conv.out_channels
        head_macs = _linear_macs(model.head) + _linear_macs(getattr(model, "head_dist", nn.Identity()))
        head_macs += _relpos_mlp_macs(model)
        pool = getattr(model, "attn_pool", None)
        pool_macs, skips = 0, 0
        if pool is not None:  # timm's AttentionPoolLatent (check_model): latent queries attend over the tokens
            kv = pool.kv.in_features * pool.kv.out_features
            head_macs += pool.latent_len * (_linear_macs(pool) - kv)
            pool_macs = kv + 2 * pool.latent_len * pool.num_heads * pool.head_dim
            skips = int(hasattr(model, "pool_include_prefix") and not model.pool_include_prefix)
        fc1 = next(m for m in block.mlp.modules() if isinstance(m, nn.Linear))
        mlp_hidden = fc1.out_features
        return cls(
            depth=len(model.blocks),
            embed_dim=int(model.embed_dim),
            num_heads=int(attn.num_heads),
            head_dim=int(getattr(attn, "head_dim", None) or attn.proj.in_features // attn.num_heads),
            mlp_hidden=int(mlp_hidden),
            num_patches=num_patches,
            num_prefix_tokens=int(model.num_prefix_tokens),
            num_classes=int(model.num_classes),
            patch_size=(int(pe.patch_size[0]), int(pe.patch_size[1])),
            img_size=(int(pe.img_size[0]), int(pe.img_size[1])) if pe.img_size is not None else (
                grid[0] * int(pe.patch_size[0]), grid[1] * int(pe.patch_size[1])),
            attn_macs_per_token=_attn_macs(attn),
            mlp_macs_per_token=_linear_macs(block.mlp),
            embed_macs=embed_macs,
            head_macs=head_macs,
            pool_macs_per_token=pool_macs,
            pool_skips_prefix=skips,
        )

    def with_patches(self, num_patches: int, img_size: tuple[int, int] | None = None) -> "ViTGeometry":
        """The same model on an input of ``num_patches`` patches (a model built with
        ``dynamic_img_size=True`` takes other sizes than it was built at): the token count and the
        patch embedding's cost follow the input; ``img_size`` is recorded when given."""
        if num_patches < 1:
            raise LTMPError(f"num_patches: must be >= 1, got {num_patches}")
        per_patch = self.embed_macs // self.num_patches  # the embedding is one convolution per patch
        return replace(self, num_patches=int(num_patches), embed_macs=per_patch * int(num_patches),
                       img_size=self.img_size if img_size is None else (int(img_size[0]), int(img_size[1])))

    def at_size(self, img_size: int | tuple[int, int]) -> "ViTGeometry":
        """The same model on ``img_size`` pixels (``int`` or ``(height, width)``): ``height // patch``
        by ``width // patch`` patches, as timm's patch embedding cuts them without padding (for a
        model built with ``dynamic_img_pad=True``, :func:`ltmp_core.count_flops` asks the model)."""
        h, w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        ph, pw = self.patch_size
        if h < ph or w < pw:
            raise LTMPError(f"img_size: {h}x{w} is smaller than one {ph}x{pw} patch")
        return self.with_patches((h // ph) * (w // pw), (h, w))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (tuples become lists)."""
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["img_size"] = list(self.img_size)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "geometry") -> "ViTGeometry":
        """Validate and build a geometry from :meth:`to_dict` output; errors name the field."""
        if not isinstance(data, Mapping):
            raise LTMPError(f"{where}: expected an object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LTMPError(f"{where}.{unknown[0]}: unknown field")
        optional = {"pool_macs_per_token": 0, "pool_skips_prefix": 0}  # added in issue 27: older plans lack them
        data = {**optional, **data}
        missing = sorted(names - set(data))
        if missing:
            raise LTMPError(f"{where}.{missing[0]}: missing")
        values: dict[str, Any] = {}
        for name in names:
            v = data[name]
            if name in ("patch_size", "img_size"):
                if (not isinstance(v, (list, tuple)) or len(v) != 2
                        or not all(isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in v)):
                    raise LTMPError(f"{where}.{name}: expected two positive integers, got {v!r}")
                values[name] = (int(v[0]), int(v[1]))
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                raise LTMPError(f"{where}.{name}: expected an integer, got {v!r}")
            low = 0 if name in ("num_prefix_tokens", "num_classes", "head_macs", *optional) else 1
            if v < low:
                raise LTMPError(f"{where}.{name}: must be >= {low}, got {v}")
            values[name] = v
        return cls(**values)


@dataclass(eq=False)
class ModelState:
    """What ltmp_core keeps on a model it cut or patched: one object, ``model._ltmp`` (:data:`STATE`).

    :func:`ltmp_core.prune_width` leaves one on a model it cut; :func:`ltmp_core.apply_plan` replaces
    it by the patch's state (a subclass that adds the plan, the mode and the record of the last
    forward pass) and carries ``cut_from`` over; :func:`ltmp_core.remove_plan` drops it, and with it
    everything ltmp_core kept on the model.

    Attributes:
        cut_from: The geometry of the model before :func:`ltmp_core.prune_width` cut its width, what
            its FLOPs ratios are ratios of; ``None`` for a model at its full width.
    """

    cut_from: ViTGeometry | None = None


def model_state(model: nn.Module) -> ModelState | None:
    """The :class:`ModelState` of ``model``, or ``None`` for a model ltmp_core has not cut or patched."""
    state = model.__dict__.get(STATE)
    return state if isinstance(state, ModelState) else None


def is_cut_from(model: nn.Module, full: ViTGeometry) -> bool:
    """Whether ``model`` is the model ``full`` describes with the width of some of its blocks cut.

    Every block keeps at most ``full``'s heads and MLP units, at least one keeps fewer, and all else
    (depth, residual width, head width, tokens, patch embedding, head) is ``full``'s.
    """
    check_model(model)
    widths = block_widths(model)
    if len(widths) != full.depth or any(h > full.num_heads or m > full.mlp_hidden for h, m in widths):
        return False
    if all((h, m) == (full.num_heads, full.mlp_hidden) for h, m in widths):
        return False
    read = ViTGeometry._read(model)
    return replace(read, num_heads=full.num_heads, mlp_hidden=full.mlp_hidden,
                   attn_macs_per_token=full.attn_macs_per_token, mlp_macs_per_token=full.mlp_macs_per_token) == full
