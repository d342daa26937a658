"""The PyTorch reference workloads for ``step_speed.py``: plain torch, imported only by the harness.

A timm-style ViT written here in plain torch (timm itself does not import beside torch 2.13 on
these machines): patch conv, class token, learned position embedding, pre-LayerNorm blocks with
one fused ``qkv`` Linear, ``F.scaled_dot_product_attention`` and a GELU MLP, final LayerNorm,
class-token pooling. It is built from a jprompt ``VisionTransformer``'s fields, so it has the
same widths, depth, heads, patch size, activation (``ACTIVATIONS``: tanh or exact GELU, or CLIP's
quick_gelu), LayerNorm eps, ``ln_pre``, patch bias and projection as the JAX backbone.

Every backbone parameter has ``requires_grad=False`` (frozen: autograd computes activation
gradients through it, never weight gradients). Only the prompt and a linear head (``num_classes``
outputs, trained as in jprompt when no zero-shot head is given) receive gradients; the optimizer
is ``torch.optim.SGD`` with momentum 0.9 over exactly those tensors. One step is zero_grad,
forward, cross-entropy, backward, ``optimizer.step()``, on one fixed random batch. The workloads:

- ``vp``: a padding prompt (four strips of width ``vp_prompt_size``, 30 at 224 px, assembled
  into an ``(S, S, 3)`` frame) added to the pixels, as ``jprompt.methods.vp`` ("padding").
- ``vpt`` / ``vpt_deep``: 10 learned tokens inserted after the class token (deep: a set per
  layer overwriting the prompt positions before layers 1..L-1), as ``jprompt.methods.vpt``.
- ``pgn``: a ResNet-10 generator (the same stem/stages/widths as ``jprompt.models.resnet``, torch
  ``BatchNorm2d`` in training mode) maps the image to (16, 256) logits whose softmax mixes a
  (256, D) token library into 16 tokens appended at the end of the sequence, as
  ``jprompt.methods.pgn``; the generator and library train.
- ``linear_probe``: the backbone forward under ``torch.no_grad()``, then the trained head.
"""

import torch
import torch.nn.functional as F
from torch import nn

VPT_TOKENS = 10
PGN_TOKENS = 16
PGN_LIBRARY = 256
PGN_WIDTHS = (16, 32, 64, 128)
METHODS = ("vp", "vpt", "vpt_deep", "pgn", "linear_probe")


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

    def attention(self, x, rows=None):
        """Multi-head self-attention, projections included (no LayerNorm, no residual); with
        ``rows`` (an index into the sequence) the outputs of those rows alone."""
        b, t, d = x.shape

        def heads(y):  # (B, T, n D) -> (n, B, H, T, D/H)
            return y.reshape(b, y.shape[1], -1, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)

        if rows is None:
            q, k, v = heads(self.qkv(x)).unbind(0)
        else:  # queries for ``rows`` only; every row gives keys and values
            weight, bias = self.qkv.weight, self.qkv.bias
            q = heads(F.linear(x[:, rows], weight[:d], bias[:d]))[0]
            k, v = heads(F.linear(x, weight[d:], bias[d:])).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.proj(y.reshape(b, q.shape[2], d))

    def mlp(self, x):
        return self.fc2(self.activation(self.fc1(x)))

    def forward(self, x, rows=None):
        x = (x if rows is None else x[:, rows]) + self.attention(self.norm1(x), rows)
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

    def forward(self, images, prompts=None, deep_prompts=None, at_end=False):
        """``images`` (B, 3, H, W); prompts (B, p, D) or deep (L, B, p, D), after the cls token
        (or at the end of the sequence with ``at_end``). Returns the pooled features."""
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
            x = block(x, slice(0, 1) if skip and last else kept)
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
    skip_discarded_rows: bool = False,
    seed: int = 0,
):
    """A no-argument function running one training step of ``method`` on the torch twin of the
    jprompt backbone ``module``; it returns the loss tensor. ``bfloat16`` runs the forward
    under ``torch.autocast`` (parameters stay float32); ``skip_discarded_rows``: see ``ViT``."""
    if method not in METHODS:
        raise ValueError(f"unknown torch reference method {method!r}; valid: {METHODS}")
    torch.manual_seed(seed)
    on = dict(device=device)
    vit = ViT(module, image_size, skip_discarded_rows).eval().to(device)
    for p in vit.parameters():
        p.requires_grad_(False)
    head = nn.Linear(vit.feature_dim, num_classes, **on)
    dim, depth = module.hidden_size, module.depth
    images = torch.randn(batch, 3, image_size, image_size, **on)
    labels = torch.randint(0, num_classes, (batch,), **on)
    trained = list(head.parameters())

    if method == "vp":
        p, inner = vp_prompt_size, image_size - 2 * vp_prompt_size
        strips = [
            torch.randn(3, *shape, **on, requires_grad=True)
            for shape in ((p, image_size), (p, image_size), (inner, p), (inner, p))
        ]
        trained += strips

        def features():
            up, down, left, right = strips
            middle = torch.cat([left, torch.zeros(3, inner, inner, **on), right], dim=2)
            return vit(images + torch.cat([up, middle, down], dim=1))

    elif method in ("vpt", "vpt_deep"):
        shape = (depth, 1, VPT_TOKENS, dim) if method == "vpt_deep" else (1, VPT_TOKENS, dim)
        tokens = (0.0625 * (2 * torch.rand(shape, **on) - 1)).requires_grad_()
        trained.append(tokens)

        def features():
            expanded = tokens.expand(*shape[:-3], batch, VPT_TOKENS, dim)
            kind = "deep_prompts" if method == "vpt_deep" else "prompts"
            return vit(images, **{kind: expanded})

    elif method == "pgn":
        generator = ResNet10(PGN_TOKENS * PGN_LIBRARY).train().to(device)
        library = (0.02 * torch.randn(PGN_LIBRARY, dim, **on)).requires_grad_()
        trained += [*generator.parameters(), library]

        def features():
            logits = generator(images).reshape(batch, PGN_TOKENS, PGN_LIBRARY)
            return vit(images, prompts=logits.softmax(-1) @ library, at_end=True)

    else:

        def features():
            with torch.no_grad():
                return vit(images)

    optimizer = torch.optim.SGD(trained, lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=bfloat16):
            logits = head(features())
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step
