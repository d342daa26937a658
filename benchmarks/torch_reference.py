"""The PyTorch reference workloads for ``step_speed.py``: plain torch, imported only by the harness.

A timm-style ViT written here in plain torch (timm itself does not import beside torch 2.13 on
these machines): patch conv, class token, learned position embedding, pre-LayerNorm blocks with
one fused ``qkv`` Linear, ``F.scaled_dot_product_attention`` and a GELU MLP, final LayerNorm,
class-token pooling. It is built from a jprompt ``VisionTransformer``'s fields, so it has the
same widths, depth, heads, patch size, activation (``ACTIVATIONS``: tanh or exact GELU, or CLIP's
quick_gelu), LayerNorm eps, ``ln_pre``, patch bias and projection as the JAX backbone;
``state_dict`` gives it a jprompt backbone's weights.

Every backbone parameter has ``requires_grad=False`` (frozen: autograd computes activation
gradients through it, never weight gradients). Only the prompt and a linear head (``num_classes``
outputs, trained as in jprompt when no zero-shot head is given) receive gradients; the optimizer
is ``torch.optim.SGD`` with momentum 0.9 over exactly those tensors. One step is zero_grad,
forward, cross-entropy, backward, ``optimizer.step()``, on one fixed random batch of pixels in
[0, 1]. The workloads (``prompted``), each with jprompt's default sizes and placement and the
official code's operations:

- ``vp``: a padding prompt (four strips of width ``vp_prompt_size``, 30 at 224 px, assembled
  into an ``(S, S, 3)`` frame) added to the pixels, as ``jprompt.methods.vp`` ("padding").
- ``vpt`` / ``vpt_deep``: 10 learned tokens inserted after the class token (deep: a set per
  layer overwriting the prompt positions before layers 1..L-1), as ``jprompt.methods.vpt``.
- ``pgn``: a ResNet-10 generator (the same stem/stages/widths as ``jprompt.models.resnet``, torch
  ``BatchNorm2d`` in training mode) maps the image to (16, 256) logits whose softmax mixes a
  (256, D) token library into 16 tokens appended at the end of the sequence, as
  ``jprompt.methods.pgn``; the generator and library train.
- ``adavipro`` (no official code is public: ``jprompt.methods.adavipro``'s defaults and
  operations): VP's padding frame added only where a region mask says so. The mask generator,
  which trains with the frame: the images' channel mean through the fixed 4-neighbour Laplacian
  (zero padding 1), a ``Conv2d(1, 64)`` with kernel and stride the region size
  (``adavipro_region_size``, 32 at 224 px: one output per region), ReLU, a 1x1
  ``Conv2d(64, 2)``; in training ``F.gumbel_softmax`` over the 2 choices at the first epoch's
  temperature 5, straight-through hard (evaluation: the argmax), choice 1's region mask
  nearest-upsampled (``repeat_interleave``) to the pixels.
- ``linear_probe``: the backbone forward under ``torch.no_grad()``, then the trained head.
- ``evp`` (UCSC-VLAA/EVP ``main.py``): the pixels shrunk to ``S - 2p`` (``F.interpolate``
  bicubic, antialiased, clamped to [0, 1]: jprompt shrinks inside its step, where the official
  code resizes in its data loader), ``F.pad`` with a black border of ``p = vp_prompt_size``, the
  official zero-initialised ``(3, S, S)`` perturbation added, then ``Normalize(mean, std)`` of
  the sum. A gradient hook makes the perturbation's gradient the official
  ``mask * g / (||g|| + 1e-10)`` (jprompt's ``normalize_gradient``); the optimizer then steps
  it like every other tensor here (the official update is plain ``lr * g``, no momentum).
- ``lor_vp`` (jincan333/LoR-VP ``LoR_VP.forward``): ``torch.bmm(left_bar, right_bar)``, a
  (3, S, S) prompt of rank 4 (``left_bar`` zeros, ``right_bar`` N(0, 0.01^2)) added to the whole
  image, then ``Normalize(mean, std)``.
- ``e2vpt`` (ChengHan111/E2VPT, ``P_VK`` defaults): 5 VPT-deep tokens per layer, each layer's
  (expanded per example) multiplied by the piece mask (``repeat`` tiling its 16 pieces along D)
  and the token mask, both trainable, starting at 1; and in every layer 5 key-value prompts per
  head, one shared ``(H, 5, D/H)`` array per layer (``kaiming_uniform_``), expanded per example
  and concatenated before that layer's keys and values after their projections.
- ``vfpt`` / ``vfpt_deep`` (runtsang/VFPT ``FNetBlock``): VPT's 10 tokens (per layer when deep)
  of which the first 5 of every set, expanded per example, pass through
  ``torch.fft.fft(torch.fft.fft(x, dim=-1), dim=-2).real`` before insertion.

E2VPT's attention, like every method's here, is the reference blocks'
``F.scaled_dot_product_attention``, where the official code writes out softmax(QK^T / sqrt(d)) V.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VPT_TOKENS = 10
PGN_TOKENS = 16
PGN_LIBRARY = 256
PGN_WIDTHS = (16, 32, 64, 128)
EVP_GRADIENT_EPS = 1e-10  # main.py: grad_p_t / (g_norm + 1e-10)
LOR_VP_RANK = 4  # bar_width
LOR_VP_INIT_STD = 0.01  # right_bar: init_method "normal"
E2VPT_TOKENS = 5  # NUM_TOKENS_P
E2VPT_KV_TOKENS = 5  # NUM_TOKENS
E2VPT_PIECES = 16  # CLS_TOKEN_P_PIECES_NUM
VFPT_FOURIER_TOKENS = 5  # floor(10 * FOURIER_PERCENTAGE 0.5)
ADAVIPRO_EMBED = 64  # embed_dim
ADAVIPRO_TEMPERATURE = 5.0  # tau0 * tau_decay ** 0, the first epoch's
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
METHODS = (
    "vp",
    "vpt",
    "vpt_deep",
    "pgn",
    "adavipro",
    "linear_probe",
    "evp",
    "lor_vp",
    "e2vpt",
    "vfpt",
    "vfpt_deep",
)
# Their reference takes pixels in [0, 1] and normalises them after prompting, as the official code.
NORMALIZES = ("evp", "lor_vp")


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def tanh_gelu(x):
    return F.gelu(x, approximate="tanh")


# jprompt's activation names (``jprompt.models.vit.ACTIVATIONS``) -> their torch functions.
ACTIVATIONS = {"gelu_tanh": tanh_gelu, "gelu_exact": F.gelu, "quick_gelu": quick_gelu}


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim, eps, activation):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.activation = activation

    def attention(self, x, rows=None, kv=None):
        """Multi-head self-attention, projections included (no LayerNorm, no residual); with
        ``rows`` (an index into the sequence) the outputs of those rows alone; ``kv`` (keys,
        values), each (B, H, m, D/H), go before the projected keys and values (E2VPT)."""
        b, t, d = x.shape

        def heads(y):  # (B, T, n D) -> (n, B, H, T, D/H)
            return y.reshape(b, y.shape[1], -1, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)

        if rows is None:
            q, k, v = heads(self.qkv(x)).unbind(0)
        else:  # queries for ``rows`` only; every row gives keys and values
            weight, bias = self.qkv.weight, self.qkv.bias
            q = heads(F.linear(x[:, rows], weight[:d], bias[:d]))[0]
            k, v = heads(F.linear(x, weight[d:], bias[d:])).unbind(0)
        if kv is not None:
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.proj(y.reshape(b, q.shape[2], d))

    def mlp(self, x):
        return self.fc2(self.activation(self.fc1(x)))

    def forward(self, x, rows=None, kv=None):
        x = (x if rows is None else x[:, rows]) + self.attention(self.norm1(x), rows, kv)
        return x + self.mlp(self.norm2(x))


def block_like(module) -> Block:
    """A ``Block`` with the widths, heads, LayerNorm eps and activation of the jprompt
    ``VisionTransformer`` ``module``'s encoder blocks."""
    return Block(
        module.hidden_size,
        module.num_heads,
        module.mlp_dim,
        module.layernorm_epsilon,
        ACTIVATIONS[module.activation],
    )


class ViT(nn.Module):
    """The torch twin of a jprompt ``VisionTransformer`` (class-token pooling only).

    By default every block computes every row, as timm and the official VPT code do.
    ``skip_discarded_rows`` skips the outputs nothing reads, as jprompt does: VPT-deep's prompt
    rows before the next layer overwrites them, and all but the class token in the last block.
    """

    def __init__(self, module, image_size: int, skip_discarded_rows: bool = False):
        super().__init__()
        self.skip_discarded_rows = skip_discarded_rows
        dim, patch = module.hidden_size, module.patch_size
        eps = module.layernorm_epsilon
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch, bias=module.patch_bias)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + (image_size // patch) ** 2, dim))
        self.pre_norm = nn.LayerNorm(dim, eps=eps) if module.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(block_like(module) for _ in range(module.depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        proj = module.projection_dim
        self.proj = nn.Linear(dim, proj, bias=False) if proj else nn.Identity()
        self.feature_dim = proj or dim

    def forward(self, images, prompts=None, deep_prompts=None, at_end=False, kv_prompts=None):
        """``images`` (B, 3, H, W); prompts (B, p, D) or deep (L, B, p, D), after the cls token
        (or at the end of the sequence with ``at_end``); ``kv_prompts`` (keys, values), each
        (L, B, H, m, D/H), layer i's for block i. Returns the pooled features."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if deep_prompts is not None:
            prompts = deep_prompts[0]
        start = x.shape[1] if at_end else 1
        if prompts is not None:
            x = torch.cat([x[:, :start], prompts, x[:, start:]], dim=1)
        x = self.pre_norm(x)
        skip = self.skip_discarded_rows
        kept = None  # with skipping, the rows the layers before the last compute
        if skip and deep_prompts is not None:
            mask = torch.ones(x.shape[1], dtype=torch.bool)
            mask[start : start + deep_prompts.shape[2]] = False
            kept = mask.nonzero().squeeze(1).to(x.device)
        for i, block in enumerate(self.blocks):
            if deep_prompts is not None and i > 0:
                # Overwrite the prompt rows, or put them back where the previous block skipped them.
                end = start if skip else start + deep_prompts.shape[2]
                x = torch.cat([x[:, :start], deep_prompts[i], x[:, end:]], dim=1)
            last = i == len(self.blocks) - 1
            kv = None if kv_prompts is None else (kv_prompts[0][i], kv_prompts[1][i])
            x = block(x, slice(0, 1) if skip and last else kept, kv)
        return self.proj(self.norm(x)[:, 0])


class ResNet10(nn.Module):
    """PGN's generator: the layout of ``jprompt.models.resnet.ResNet10`` in torch."""

    def __init__(self, num_outputs: int):
        super().__init__()
        w = PGN_WIDTHS
        self.stem = nn.Sequential(
            nn.Conv2d(3, w[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(w[0]),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        self.stages = nn.ModuleList()
        for i, width in enumerate(w):
            stride = 2 if i else 1
            inner = nn.Sequential(
                nn.Conv2d(w[max(i - 1, 0)], width, 3, stride, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, 1, 1, bias=False),
                nn.BatchNorm2d(width),
            )
            shortcut = nn.Conv2d(w[i - 1], width, 1, 2) if i else nn.Identity()
            self.stages.append(nn.ModuleList([inner, shortcut]))
        self.output = nn.Linear(w[-1], num_outputs)

    def forward(self, x):
        x = self.stem(x)
        for inner, shortcut in self.stages:
            x = F.relu(inner(x) + shortcut(x))
        return self.output(x.mean(dim=(2, 3)))


def state_dict(module, params) -> dict:
    """The jprompt backbone ``module``'s ``params`` (its ``Transformer``, ``embedding``, ``cls``
    and ``proj`` entries) as the state dict of ``ViT(module, ...)``: torch's (out, in) Linear
    and (D, 3, P, P) conv layouts, one fused ``qkv``."""

    def t(x):
        return torch.from_numpy(np.array(x, np.float32))

    d, tr = module.hidden_size, params["Transformer"]
    state = {
        "patch_embed.weight": t(params["embedding"]["kernel"]).permute(3, 2, 0, 1),
        "cls": t(params["cls"]),
        "pos_embed": t(tr["posembed_input"]["pos_embedding"]),
        "norm.weight": t(tr["encoder_norm"]["scale"]),
        "norm.bias": t(tr["encoder_norm"]["bias"]),
    }
    if module.patch_bias:
        state["patch_embed.bias"] = t(params["embedding"]["bias"])
    if module.pre_norm:
        state["pre_norm.weight"] = t(tr["pre_norm"]["scale"])
        state["pre_norm.bias"] = t(tr["pre_norm"]["bias"])
    if module.projection_dim:
        state["proj.weight"] = t(params["proj"]["kernel"]).T
    for i in range(module.depth):
        block, name = tr[f"encoderblock_{i}"], f"blocks.{i}."
        att, mlp = block["MultiHeadDotProductAttention_0"], block["MlpBlock_0"]
        qkv = [att[n] for n in ("query", "key", "value")]  # kernels (D, H, D/H)
        state[name + "qkv.weight"] = torch.cat([t(p["kernel"]).reshape(d, d).T for p in qkv])
        state[name + "qkv.bias"] = torch.cat([t(p["bias"]).reshape(d) for p in qkv])
        state[name + "proj.weight"] = t(att["out"]["kernel"]).reshape(d, d).T
        state[name + "proj.bias"] = t(att["out"]["bias"])
        for ours, theirs in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
            state[f"{name}{theirs}.weight"] = t(block[ours]["scale"])
            state[f"{name}{theirs}.bias"] = t(block[ours]["bias"])
        for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            state[f"{name}{theirs}.weight"] = t(mlp[ours]["kernel"]).T
            state[f"{name}{theirs}.bias"] = t(mlp[ours]["bias"])
    return state


class RegionMask(nn.Module):
    """AdaViPro's mask generator: images (B, 3, S, S) -> 0/1 masks (B, 1, S, S), constant on
    each ``region`` x ``region`` region (Gumbel-sampled in training, the argmax in eval)."""

    def __init__(self, region: int):
        super().__init__()
        self.region = region
        self.register_buffer("laplacian", torch.tensor(LAPLACIAN).view(1, 1, 3, 3))
        self.convergence = nn.Conv2d(1, ADAVIPRO_EMBED, region, stride=region)
        self.policy = nn.Conv2d(ADAVIPRO_EMBED, 2, 1)

    def forward(self, images):
        edges = F.conv2d(images.mean(1, keepdim=True), self.laplacian, padding=1)
        logits = self.policy(F.relu(self.convergence(edges)))  # (B, 2, R, R)
        if self.training:
            choice = F.gumbel_softmax(logits, ADAVIPRO_TEMPERATURE, hard=True, dim=1)
        else:
            choice = F.one_hot(logits.argmax(1), 2).permute(0, 3, 1, 2).to(logits.dtype)
        regions = choice[:, 1:]
        return regions.repeat_interleave(self.region, 2).repeat_interleave(self.region, 3)


def padding_frame(image_size: int, width: int, device):
    """``(strips, frame)``: VP's four N(0, 1) strips by name and ``frame()``, the (3, S, S)
    prompt they make, zero inside."""
    inner = image_size - 2 * width
    shapes = ((width, image_size), (width, image_size), (inner, width), (inner, width))
    strips = [torch.randn(3, *shape, device=device, requires_grad=True) for shape in shapes]

    def frame():
        up, down, left, right = strips
        middle = torch.cat([left, torch.zeros(3, inner, inner, device=device), right], dim=2)
        return torch.cat([up, middle, down], dim=1)

    return dict(zip(("up", "down", "left", "right"), strips, strict=True)), frame


def uniform_tokens(shape, module, device):
    """VPT's token init: U(-v, v), ``v = sqrt(6 / (3 P^2 + D))``."""
    bound = math.sqrt(6.0 / (3 * module.patch_size**2 + module.hidden_size))
    return (bound * (2 * torch.rand(shape, device=device) - 1)).requires_grad_()


def prompted(
    method: str,
    vit: ViT,
    module,
    *,
    image_size: int,
    vp_prompt_size: int = 30,
    normalization=((0.5,) * 3, (0.5,) * 3),
    adavipro_region_size: int = 32,
    train: bool = True,
    device: str = "cpu",
):
    """``(trained, features)``: the tensors ``method`` trains beside the head, by name, and
    ``features(images)``, ``vit``'s pooled features of the prompted (B, 3, S, S) ``images``.
    ``normalization`` is the backbone's ``(mean, std)`` per channel for ``NORMALIZES``'s
    methods, whose images are pixels in [0, 1]; ``vp_prompt_size`` is VP's, EVP's and
    AdaViPro's frame; ``train=False`` puts the generators (PGN's BatchNorm, AdaViPro's
    Gumbel sample) in evaluation mode."""
    if method not in METHODS:
        raise ValueError(f"unknown torch reference method {method!r}; valid: {METHODS}")
    on = dict(device=device)
    dim, depth, heads = module.hidden_size, module.depth, module.num_heads
    mean, std = (torch.tensor(v, **on).view(3, 1, 1) for v in normalization)

    if method == "vp":
        strips, frame = padding_frame(image_size, vp_prompt_size, device)

        def features(images):
            return vit(images + frame())

        return strips, features

    if method == "adavipro":
        strips, frame = padding_frame(image_size, vp_prompt_size, device)
        generator = RegionMask(adavipro_region_size).train(train).to(device)

        def features(images):
            return vit(images + frame() * generator(images))

        trained = {f"generator.{n}": p for n, p in generator.named_parameters()}
        return strips | trained, features

    if method in ("vpt", "vpt_deep"):
        shape = (depth, 1, VPT_TOKENS, dim) if method == "vpt_deep" else (1, VPT_TOKENS, dim)
        tokens = uniform_tokens(shape, module, device)

        def features(images):
            expanded = tokens.expand(*shape[:-3], images.shape[0], VPT_TOKENS, dim)
            kind = "deep_prompts" if method == "vpt_deep" else "prompts"
            return vit(images, **{kind: expanded})

        return {"tokens": tokens}, features

    if method == "pgn":
        generator = ResNet10(PGN_TOKENS * PGN_LIBRARY).train(train).to(device)
        library = (0.02 * torch.randn(PGN_LIBRARY, dim, **on)).requires_grad_()

        def features(images):
            logits = generator(images).reshape(images.shape[0], PGN_TOKENS, PGN_LIBRARY)
            return vit(images, prompts=logits.softmax(-1) @ library, at_end=True)

        trained = {f"generator.{n}": p for n, p in generator.named_parameters()}
        return trained | {"library": library}, features

    if method == "evp":
        p, inner = vp_prompt_size, image_size - 2 * vp_prompt_size
        perturbation = torch.zeros(3, image_size, image_size, **on, requires_grad=True)
        mask = torch.ones(3, image_size, image_size, **on)
        mask[:, p : image_size - p, p : image_size - p] = 0
        # The official update direction: the whole canvas's gradient at unit norm, then masked.
        perturbation.register_hook(lambda g: mask * g / (g.norm() + EVP_GRADIENT_EPS))

        def features(images):
            shrunk = F.interpolate(images, (inner, inner), mode="bicubic", antialias=True)
            padded = F.pad(shrunk.clamp(0, 1), (p, p, p, p), "constant", value=0)
            return vit((padded + perturbation - mean) / std)

        return {"perturbation": perturbation}, features

    if method == "lor_vp":
        left_bar = torch.zeros(3, image_size, LOR_VP_RANK, **on, requires_grad=True)
        right_bar = LOR_VP_INIT_STD * torch.randn(3, LOR_VP_RANK, image_size, **on)
        right_bar.requires_grad_()

        def features(images):
            return vit((images + torch.bmm(left_bar, right_bar) - mean) / std)

        return {"left_bar": left_bar, "right_bar": right_bar}, features

    if method == "e2vpt":
        tokens = uniform_tokens((depth, E2VPT_TOKENS, dim), module, device)
        kv = torch.empty(depth, heads, E2VPT_KV_TOKENS, dim // heads, **on)
        for layer in kv:  # each layer's own (H, m, D/H) parameter, as officially
            nn.init.kaiming_uniform_(layer, a=0, mode="fan_in", nonlinearity="leaky_relu")
        kv.requires_grad_()
        token_mask = torch.ones(E2VPT_TOKENS, **on, requires_grad=True)
        piece_mask = torch.ones(E2VPT_TOKENS, E2VPT_PIECES, **on, requires_grad=True)

        def features(images):
            b = images.shape[0]
            deep = tokens[:, None].expand(depth, b, E2VPT_TOKENS, dim)
            deep = deep * piece_mask.repeat((1, dim // E2VPT_PIECES)) * token_mask.view(-1, 1)
            kv_b = kv[:, None].expand(depth, b, *kv.shape[1:])
            return vit(images, deep_prompts=deep, kv_prompts=(kv_b, kv_b))

        masks = {"token_mask": token_mask, "piece_mask": piece_mask}
        return {"tokens": tokens, "kv": kv} | masks, features

    if method in ("vfpt", "vfpt_deep"):
        deep = method == "vfpt_deep"
        shape = (depth, VPT_TOKENS, dim) if deep else (VPT_TOKENS, dim)
        tokens = uniform_tokens(shape, module, device)

        def features(images):
            sets = tokens[..., None, :, :].expand(*shape[:-2], images.shape[0], *shape[-2:])
            m = VFPT_FOURIER_TOKENS
            fourier = torch.fft.fft(torch.fft.fft(sets[..., :m, :], dim=-1), dim=-2).real
            prompts = torch.cat([fourier, sets[..., m:, :]], dim=-2)
            return vit(images, **{"deep_prompts" if deep else "prompts": prompts})

        return {"tokens": tokens}, features

    def features(images):  # linear_probe
        with torch.no_grad():
            return vit(images)

    return {}, features


def make_step(
    module,
    method: str,
    *,
    batch: int,
    image_size: int,
    num_classes: int,
    device: str = "cpu",
    bfloat16: bool = False,
    vp_prompt_size: int = 30,
    normalization=((0.5,) * 3, (0.5,) * 3),
    adavipro_region_size: int = 32,
    skip_discarded_rows: bool = False,
    seed: int = 0,
):
    """A no-argument function running one training step of ``method`` on the torch twin of the
    jprompt backbone ``module``; it returns the loss tensor. ``bfloat16`` runs the forward
    under ``torch.autocast`` (parameters stay float32); ``skip_discarded_rows``: see ``ViT``;
    ``vp_prompt_size``, ``normalization`` and ``adavipro_region_size``: see ``prompted``."""
    torch.manual_seed(seed)
    on = dict(device=device)
    vit = ViT(module, image_size, skip_discarded_rows).eval().to(device)
    for p in vit.parameters():
        p.requires_grad_(False)
    trained, features = prompted(
        method,
        vit,
        module,
        image_size=image_size,
        vp_prompt_size=vp_prompt_size,
        normalization=normalization,
        adavipro_region_size=adavipro_region_size,
        device=device,
    )
    head = nn.Linear(vit.feature_dim, num_classes, **on)
    images = torch.rand(batch, 3, image_size, image_size, **on)
    labels = torch.randint(0, num_classes, (batch,), **on)
    optimizer = torch.optim.SGD([*head.parameters(), *trained.values()], lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=bfloat16):
            logits = head(features(images))
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step
