"""
The EchoGen model: a minimal MM-DiT (SD3's multimodal diffusion transformer) that reads a caption,
a layout (one token per instance: a phrase and a box) and a noisy image, and predicts the
rectified-flow velocity v = eps - x0 (docs/design.md, "The model").

Built bottom-up, one screen per class, as nanoGPT's model.py is:
  RMSNorm, modulate, sinusoidal/Fourier embeddings  ->  TextEncoder  ->  LayoutEmbedding
  ->  LayoutMap  ->  IDM (CAS, L_dis)  ->  MMDiTBlock (two streams, one joint attention)  ->  FinalLayer, PixelHead
  ->  GroundingHead (a DETR decoder over the image tokens)  ->  ModelConfig, EchoGen.
It imports torch and nothing of this repository, so it can be copied into another project alone;
the losses that train it are in objectives.py.

Two streams, as in SD3: the image stream (patch tokens) and the condition stream (caption
tokens followed by layout tokens). Each stream has its own weights; both meet in one
scaled-dot-product attention per block. adaLN-Zero modulation (DiT) from the timestep and the
pooled caption makes a fresh model the identity on its residual streams.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# small pieces


class RMSNorm(nn.Module):
    """RMS norm with a learned gain; used on q and k per head (SD3's qk-norm keeps logits bounded)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def modulate(x, shift, scale):
    # x: (B, L, D); shift, scale: (B, D), broadcast over the sequence
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as DiT's integer timesteps are). (B,) -> (B, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def fourier_box_embedding(values, n_freqs):
    """GLIGEN/CreatiLayout Fourier features of the last axis: xyxy boxes (B, N, 4) -> (B, N, 4 * 2 * n_freqs),
    or any (..., K) -> (..., K * 2 * n_freqs) (LayoutMap embeds positions inside boxes with it)."""
    freqs = math.pi * 2.0 ** torch.arange(n_freqs, device=values.device, dtype=torch.float32)
    args = values.float().unsqueeze(-1) * freqs  # (..., K, F)
    return torch.cat([args.sin(), args.cos()], dim=-1).flatten(-2)  # (..., K * 2F)


def sincos_pos_embed_2d(grid, dim):
    """Fixed 2-D sin-cos position embedding of a grid x grid patch lattice (DiT/MAE). -> (grid*grid, dim)"""
    coords = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out = [f(pos.flatten()[:, None] * omega[None]) for pos in (yy, xx) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)  # (grid*grid, dim)


class MLP(nn.Module):
    def __init__(self, dim, hidden, out=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def key_padding_mask(ids):
    """(B, L) token ids -> (B, L) bool, True where a key may be attended. Position 0 always stays
    visible so that an all-padding sequence (a dropped caption, an empty instance slot) still has
    one key and never yields NaN from softmax over nothing: its pad embedding acts as a null token."""
    mask = ids != 0
    mask[:, 0] = True
    return mask


def trim_padding(ids):
    """Cut the trailing columns that are padding in every row: (B, L) -> (B, L') with L' the longest
    sequence. Exact, since padded keys are masked anyway, and the text encoder is the costliest
    part of a CPU step when captions are padded to their maximum length."""
    longest = int((ids != 0).sum(dim=1).max().clamp(min=1))
    return ids[:, :longest]


# -----------------------------------------------------------------------------
# condition encoders


class TextEncoder(nn.Module):
    """A small bidirectional transformer over word ids, trained from scratch (the vocabulary is
    closed and tiny, so no pretrained text model is needed). Used for captions and for phrases."""

    def __init__(self, vocab_size, max_len, dim, depth, heads):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.pos_emb, std=0.02)

    def forward(self, ids):
        """(B, L) ids -> tokens (B, L, D), key mask (B, L), mean-pooled (B, D) over visible tokens."""
        mask = key_padding_mask(ids)
        x = self.tok_emb(ids) + self.pos_emb[:, : ids.shape[1]]
        x = self.norm(self.layers(x, src_key_padding_mask=~mask))
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1)
        return x, mask, pooled


class LayoutEmbedding(nn.Module):
    """One token per instance (CreatiLayout): MLP([Fourier(box), pooled phrase]), its first layer
    written as a box projection plus a phrase projection; a learned null token fills empty slots
    (and every slot when the condition is dropped for CFG). The same MLP makes the grounding
    queries, with a learned "box unknown" vector in place of the projected box: the layout token
    of an instance whose box is what we ask for. The vector replaces the projection rather than the
    Fourier features so that the grounding loss never trains the box projection: fed a constant
    input in every query, it would receive grounding gradients ~100 x the flow's (measured at
    PMTP's start), which under Adam's per-weight normalization drown the generator's signal there."""

    def __init__(self, dim, n_freqs, queries=True):
        super().__init__()
        self.n_freqs = n_freqs
        self.box_proj = nn.Linear(8 * n_freqs, dim)
        self.phrase_proj = nn.Linear(dim, dim)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.null, std=0.02)
        # only a model that grounds has queries (an unused parameter would also break DDP's reduction)
        if queries:
            self.box_unknown = nn.Parameter(torch.zeros(dim))
            nn.init.normal_(self.box_unknown, std=0.5)  # the scale of a projected box (std ~0.6 at xavier init)

    def forward(self, phrase_pooled, boxes, instance_mask):
        """phrase_pooled (B, N, D), boxes (B, N, 4) xyxy in [0, 1] or None (unknown), instance_mask (B, N)."""
        if boxes is None:
            box_part = self.box_unknown.to(phrase_pooled.dtype).expand_as(phrase_pooled)
        else:
            box_part = self.box_proj(fourier_box_embedding(boxes, self.n_freqs).to(phrase_pooled.dtype))
        tokens = self.out(box_part + self.phrase_proj(phrase_pooled))
        return torch.where(instance_mask.unsqueeze(-1), tokens, self.null.to(tokens.dtype))


def position_in_boxes(boxes, res):
    """Where each pixel centre sits inside each box, in the box's own coordinates: boxes (B, N, 4) xyxy
    -> (B, N, res, res, 2) holding ((x - x0) / w, (y - y0) / h), in [0, 1] inside the box."""
    centres = (torch.arange(res, device=boxes.device, dtype=torch.float32) + 0.5) / res
    x0, y0, x1, y1 = boxes.float().unbind(-1)
    u = (centres - x0[..., None]) / (x1 - x0).clamp(min=1e-3)[..., None]  # (B, N, res): along x
    v = (centres - y0[..., None]) / (y1 - y0).clamp(min=1e-3)[..., None]  # (B, N, res): along y
    return torch.stack(torch.broadcast_tensors(u[..., None, :], v[..., :, None]), dim=-1)  # rows are y


class ConvStem(nn.Module):
    """The image's patch embedding as a few convolutions instead of one linear map per patch ("early
    convolutions", Xiao et al. 2021): a 3 x 3 conv of stride 2 per halving down to the patch grid,
    one 3 x 3 conv at the grid, then a 1 x 1 projection to D. (B, C, R, R) -> (B, D, R/p, R/p).
    A linear patch embedding sees a shape as a bag of pixels cut at patch borders; the convolutions
    see its edges and corners before the tokens mix, which is what tells a square from a circle of
    one color (docs/grounding.md, "What the head reads")."""

    def __init__(self, channels, hidden, dim, patch):
        super().__init__()
        assert patch & (patch - 1) == 0, f"a conv stem needs a power-of-two patch, got {patch}"
        layers, c = [], channels
        for stride in [2] * (patch.bit_length() - 1) + [1]:
            layers += [nn.Conv2d(c, hidden, 3, stride=stride, padding=1), nn.GroupNorm(8, hidden), nn.SiLU()]
            c = hidden
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.proj(self.convs(x))


class LayoutMap(nn.Module):
    """The layout where the pixels are: a (B, C, R, R) map whose pixel p holds
        sum_n coverage_n(p) * MLP(phrase_proj(phrase_n) + where_proj(Fourier(position of p inside box n))),
    coverage_n(p) the share of pixel p inside box n (0 outside every box). Drawing a shape then is a
    local function of the phrase and the position inside the box (is (u, v) inside a ring?), which a
    pixel can compute, instead of something the tiny network must derive from absolute positions
    and Fourier-embedded boxes (as spatial layout conditioning does with a rasterized layout). The
    model patch-embeds the map beside the image and feeds it to the pixel head (ModelConfig.layout_map)."""

    def __init__(self, dim, channels, n_freqs=4):
        super().__init__()
        self.n_freqs = n_freqs
        self.phrase_proj = nn.Linear(dim, channels)
        self.where_proj = nn.Linear(4 * n_freqs, channels)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(channels, channels))

    def forward(self, phrase_pooled, boxes, visible, res):
        """phrase_pooled (B, N, D), boxes (B, N, 4) xyxy, visible (B, N) bool: the instances the image may
        read (real, not dropped for CFG, not in a grounding row, whose boxes are the answer) -> (B, C, R, R).
        Only the visible instances are computed (most of the N slots are empty), then summed per image."""
        B, C = boxes.shape[0], self.phrase_proj.out_features
        rows, _ = visible.nonzero(as_tuple=True)  # (M,): the image of each visible instance
        boxes, phrase_pooled = boxes[visible], phrase_pooled[visible]  # (M, 4), (M, D)
        coverage = patch_box_coverage(boxes[None], res)[0]  # (M, R*R)
        where = self.where_proj(fourier_box_embedding(position_in_boxes(boxes[None], res)[0], self.n_freqs))  # (M, R, R, C)
        features = self.out(where.to(phrase_pooled.dtype) + self.phrase_proj(phrase_pooled)[:, None, None])
        features = features.flatten(1, 2) * coverage[..., None].to(features.dtype)  # (M, R*R, C)
        summed = features.new_zeros(B, res * res, C).index_add_(0, rows, features)  # (B, R*R, C)
        return summed.transpose(1, 2).reshape(B, C, res, res)


# -----------------------------------------------------------------------------
# the joint-attention block


class StreamWeights(nn.Module):
    """The per-stream half of an MM-DiT block: adaLN modulation, qkv with qk-norm, output
    projection and MLP. Split into before/after attention as SD3.5's mmditx.py does, so the
    attention call that mixes the streams is one small function (joint_attention)."""

    def __init__(self, dim, heads, mlp_ratio, pre_only=False):
        super().__init__()
        self.heads = heads
        self.pre_only = pre_only  # only gives keys and values (SD3's last context block): no output
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))

    def pre_attention(self, x, c):
        """x: (B, L, D), c: (B, D) -> q, k, v each (B, H, L, D/H), and the modulation for later."""
        shift_a, scale_a, *post_modulation = self.adaLN(c).chunk(2 if self.pre_only else 6, dim=-1)
        B, L, D = x.shape
        qkv = self.qkv(modulate(self.norm1(x), shift_a, scale_a))
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D/H)
        return (self.q_norm(q), self.k_norm(k), v), post_modulation

    def post_attention(self, x, attn_out, modulation):
        gate_a, shift_m, scale_m, gate_m = modulation
        x = x + gate_a.unsqueeze(1) * self.proj(attn_out)
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


def joint_attention(qkv_streams, attn_mask):
    """Concatenate the streams' q, k, v along the sequence, one fused attention call, split back.
    qkv_streams: list of (q, k, v), each (B, H, L_i, Dh); attn_mask: bool (True = may attend) or
    additive float (box_attention_bias), broadcastable to (B, H, L, L) with L = sum L_i.
    Returns a list of (B, L_i, H*Dh)."""
    q, k, v = (torch.cat(parts, dim=2) for parts in zip(*qkv_streams))
    if attn_mask.is_floating_point():
        attn_mask = attn_mask.to(q.dtype)  # SDPA wants a float mask in the queries' dtype (bf16 under autocast)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, Dh)
    out = out.transpose(1, 2).flatten(2)  # (B, L, H*Dh)
    return list(out.split([s[0].shape[2] for s in qkv_streams], dim=1))


# -----------------------------------------------------------------------------
# IDM, the instance-disentangled module (I-DRUID, docs/design.md "The model"), in MM-DiT form
#
# I-DRUID's U-Net gives every instance its own cross-attention; its output, the instance's
# "enhanced features" E_n, is a full channels x height x width map, and channel weights alpha_n
# split it into R+ = alpha_n E_n (the forward pass uses it) and R- = (1 - alpha_n) E_n, with
# L_dis = softplus(CAS(R+) - CAS(R-)) asking the channels the model keeps to stay inside the box.
# Here that cross-attention is a per-instance branch of the image stream beside the joint attention:
# the image queries of every block attend over the keys of one instance only, its phrase's tokens,
# its layout token and a null key whose value is 0. So
#     E_n = softmax(q K_n^T / sqrt(Dh)) V_n        (M, H, P, K) @ (M, H, K, Dh) -> (M, P, D)
# is a sum over several keys, each with its own value: channel d of E_n mixes the K spatial maps
# with its own weights, so channels spread differently and alpha has maps to choose between (with
# one key per instance, as a layout token in the joint attention is, every channel of a head shares
# one map and CAS(R+) = CAS(R-) for any alpha). The null key lets a patch take nothing from the
# instance. M is the number of instances the image reads (real, not dropped for CFG, in a
# generation row), computed alone, since most of the max_instances slots are empty.
# out(sum_n R+_n) is added to the image stream's attention output; out is zero-initialized, so a
# fresh IDM is the identity (an IDM switched on from a plain checkpoint starts where it was), while
# L_dis, which reads E and alpha and not out, has a gradient from the first step.


def patch_box_coverage(boxes, grid):
    """The share of each patch covered by each box: boxes (B, N, 4) xyxy in [0, 1] -> (B, N, grid*grid)
    in [0, 1], patches row-major as patch_embed flattens them. Soft, so that a box narrower than a
    patch still owns the patches it touches."""
    edges = torch.arange(grid + 1, device=boxes.device, dtype=torch.float32) / grid

    def overlap(lo, hi):  # (B, N) -> (B, N, grid): the covered share of each row (or column) of patches
        return (torch.minimum(hi[..., None], edges[1:]) - torch.maximum(lo[..., None], edges[:-1])).clamp(min=0) * grid

    x0, y0, x1, y1 = boxes.float().unbind(-1)
    return (overlap(y0, y1)[..., :, None] * overlap(x0, x1)[..., None, :]).flatten(-2)  # (B, N, g, g) -> (B, N, P)


def cas(mass, box_mask, eps=1e-6):
    """CAS, how far an instance's map spreads outside its box: the share of its mass lying outside.
    mass (B, N, P) >= 0 (|R| summed over channels), box_mask (B, N, P) in [0, 1] -> (B, N) in [0, 1],
    0 when all the mass is inside the box, 1 when all of it is outside."""
    mass = mass.float()
    return (mass * (1 - box_mask)).sum(-1) / (mass.sum(-1) + eps)


def disentangle_loss(mass_relevant, mass_spurious, box_mask, active):
    """I-DRUID's L_dis = softplus(CAS(R+) - CAS(R-)), the mean over the active instances (B, N) bool
    (0 when there are none, without a data-dependent branch, so torch.compile keeps one graph)."""
    per_instance = F.softplus(cas(mass_relevant, box_mask) - cas(mass_spurious, box_mask))  # (B, N)
    weight = active.float()
    return (per_instance * weight).sum() / weight.sum().clamp(min=1)


def split_instance_features(E, alpha, box_mask):
    """I-DRUID's split: E (M, P, D), the enhanced features of M instances; alpha (M, D) in [0, 1];
    box_mask (M, P), each instance's box at patch resolution. -> R+ = alpha E (M, P, D) and
    L_dis = softplus(CAS(R+) - CAS(R-)), R- = (1 - alpha) E, CAS on |R| summed over channels."""
    relevant = alpha[:, None] * E
    spurious = E - relevant  # (1 - alpha) E
    mass = lambda R: R.abs().sum(-1)[None]  # (1, M, P), cas's (B, N, P) with the instances as N
    everyone = torch.ones(1, E.shape[0], dtype=torch.bool, device=E.device)
    return relevant, disentangle_loss(mass(relevant), mass(spurious), box_mask[None], everyone)


class IDM(nn.Module):
    """The per-instance branch of one block (the section comment says what and why):
    E_n = attention of the image queries over instance n's own keys, alpha_n = sigmoid(MLP([E_n pooled
    inside its box, layout token n])), and out(sum_n alpha_n E_n) for the image stream."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.null_key = nn.Parameter(torch.randn(heads, 1, dim // heads))  # its value is 0
        self.alpha = MLP(2 * dim, dim, dim)  # fc2 zero-initialized (EchoGen._init_weights): alpha = 1/2
        self.out = nn.Linear(dim, dim)  # zero-initialized (EchoGen._init_weights): a fresh IDM adds 0

    def enhanced_features(self, image_tokens, inputs):
        """image_tokens (B, P, D) -> E (M, P, D), the branch's attention output per instance."""
        rows, keys, key_mask = inputs["rows"], inputs["keys"], inputs["key_mask"]  # (M,), (M, K, D), (M, K)
        (M, K, D), H, P = keys.shape, self.heads, image_tokens.shape[1]
        q = self.q(F.layer_norm(image_tokens, (D,)))[rows].view(M, P, H, D // H).transpose(1, 2)  # (M, H, P, Dh)
        k, v = self.kv(keys).view(M, K, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 x (M, H, K, Dh)
        k = torch.cat([self.k_norm(k), self.k_norm(self.null_key).to(k.dtype).expand(M, -1, -1, -1)], dim=2)
        v = torch.cat([v, v.new_zeros(M, H, 1, D // H)], dim=2)  # (M, H, K + 1, Dh)
        mask = torch.cat([key_mask, key_mask.new_ones(M, 1)], dim=1)[:, None, None, :]  # (M, 1, 1, K + 1)
        E = F.scaled_dot_product_attention(self.q_norm(q), k, v, attn_mask=mask)  # (M, H, P, Dh)
        return E.transpose(1, 2).flatten(2)  # (M, P, D), heads side by side

    def forward(self, image_tokens, inputs):
        """image_tokens (B, P, D): the image stream entering the block; inputs: EchoGen.idm_inputs.
        -> (B, P, D) to add to the image stream's attention output, L_dis of this block (a scalar)."""
        E = self.enhanced_features(image_tokens, inputs)
        box_mask = inputs["box_mask"]  # (M, P)
        inside = box_mask / box_mask.sum(-1, keepdim=True).clamp(min=1e-6)  # a mean over the box
        pooled = torch.einsum("mp,mpd->md", inside.to(E.dtype), E)  # (M, D)
        D = E.shape[-1]
        features = torch.cat([F.layer_norm(pooled, (D,)), F.layer_norm(inputs["layout_tokens"], (D,))], dim=-1)
        alpha = torch.sigmoid(self.alpha(features))  # (M, D)
        relevant, idm_loss = split_instance_features(E, alpha, box_mask)
        summed = image_tokens.new_zeros(image_tokens.shape).index_add_(0, inputs["rows"], relevant.to(image_tokens.dtype))
        return self.out(summed), idm_loss  # summed: sum_n R+_n per image, (B, P, D)


class MMDiTBlock(nn.Module):
    """cond_pre_only: in the last block nothing reads the condition stream's output, so (as in SD3)
    it only lends its keys and values; unused weights would also break DDP's gradient reduction.
    idm: the block holds an IDM (ModelConfig.idm)."""

    def __init__(self, dim, heads, mlp_ratio, cond_pre_only=False, idm=False):
        super().__init__()
        self.cond_stream = StreamWeights(dim, heads, mlp_ratio, pre_only=cond_pre_only)
        self.image_stream = StreamWeights(dim, heads, mlp_ratio)
        self.idm = IDM(dim, heads) if idm else None

    def forward(self, cond_tokens, image_tokens, c, attn_mask, idm_inputs=None):
        """-> (cond_tokens, image_tokens); cond_tokens is None from a pre-only block.
        idm_inputs (for a block with IDM; EchoGen.idm_inputs makes them)
        -> (cond_tokens, image_tokens, L_dis of this block)."""
        cond_qkv, cond_mod = self.cond_stream.pre_attention(cond_tokens, c)
        image_qkv, image_mod = self.image_stream.pre_attention(image_tokens, c)
        cond_out, image_out = joint_attention([cond_qkv, image_qkv], attn_mask)
        if idm_inputs is not None:
            added, idm_loss = self.idm(image_tokens, idm_inputs)
            image_out = image_out + added
        cond_tokens = None if self.cond_stream.pre_only else self.cond_stream.post_attention(cond_tokens, cond_out, cond_mod)
        image_tokens = self.image_stream.post_attention(image_tokens, image_out, image_mod)
        return (cond_tokens, image_tokens) if idm_inputs is None else (cond_tokens, image_tokens, idm_loss)


class FinalLayer(nn.Module):
    """adaLN + linear to patch pixels (channels per pixel: the image's, or the pixel head's input),
    zero-initialized without a pixel head (whose last conv is zero instead) so a fresh model predicts 0."""

    def __init__(self, dim, patch, channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class PixelHead(nn.Module):
    """The output path at pixel resolution, after unpatchify (U-ViT puts a 3 x 3 convolution there):
    [the transformer's per-pixel features | x_t | the layout map] -> 1x1 conv -> 3x3 conv -> 1x1 conv.
    A linear unpatchify gives every pixel of a patch its own weights but no neighbour across the
    patch border, so shapes come out as blocks with patch seams; here each pixel also sees its
    neighbours, the noisy input it must denoise, and where it sits in the layout. The last conv is
    zero-initialized, so a fresh model still predicts 0."""

    def __init__(self, in_channels, hidden, channels):
        super().__init__()
        self.inp = nn.Conv2d(in_channels, hidden, 1)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, channels, 1)

    def forward(self, features, x_t, layout_map=None):
        """features (B, Cf, R, R), x_t (B, C, R, R), layout_map (B, Cm, R, R) or None -> (B, C, R, R)"""
        inputs = [features, x_t] + ([] if layout_map is None else [layout_map])
        x = torch.cat([part.to(features.dtype) for part in inputs], dim=1)
        x = F.gelu(self.inp(x), approximate="tanh")
        return self.out(F.gelu(self.conv(x), approximate="tanh"))


def task_attention_mask(caption_mask, instance_mask, task, n_queries, n_image):
    """The task-aware mask of the packed sequence [caption | layout | queries | image] (docs/design.md,
    "The model": shared tokens and task-aware masks), True = may attend. Rows of task 0 (generation)
    are denoised from the layout; rows of task 1 (grounding) hide the layout tokens from every token,
    so that nothing in the row can copy the boxes it is asked for, and their queries read the
    caption, the image and each other. No token but a query ever reads a query.
    caption_mask (B, Lc), instance_mask (B, N), task (B,) -> (B, 1, L, L)."""
    B, N = instance_mask.shape
    grounding = (task == 1)[:, None]  # (B, 1)
    layout_visible = (~grounding).expand(B, N)
    queries_visible = instance_mask & grounding
    ones = lambda n: torch.ones(B, n, dtype=torch.bool, device=task.device)
    zeros = lambda n: torch.zeros(B, n, dtype=torch.bool, device=task.device)
    keys_of_others = torch.cat([caption_mask, layout_visible, zeros(n_queries), ones(n_image)], dim=1)  # (B, L)
    keys_of_queries = torch.cat([caption_mask, zeros(N), queries_visible, ones(n_image)], dim=1)  # (B, L)
    n_before = caption_mask.shape[1] + N
    rows = [keys_of_others[:, None].expand(-1, n_before, -1),
            keys_of_queries[:, None].expand(-1, n_queries, -1),
            keys_of_others[:, None].expand(-1, n_image, -1)]
    return torch.cat(rows, dim=1)[:, None]  # (B, 1, L, L)


def box_attention_bias(attn_mask, box_coverage, instance_mask, n_caption, strength):
    """The spatial prior of layout conditioning: the boolean mask (B, 1, 1 or L, L) as an additive
    float mask (B, 1, L, L), plus strength x the share of image patch p covered by instance n's box
    on the logit of image query p for layout key n. box_coverage (B, N, P) (patch_box_coverage),
    instance_mask (B, N): real, not dropped instances; n_caption: the caption tokens before the
    layout tokens. Only image rows get the prior; layout and query tokens attend by the mask alone.
    Why: without it the tiny model had to discover from scratch which patch lies in which Fourier-
    embedded box; that took ~250 steps alone and never happened within 2000 steps beside the
    grounding task (docs/experiments.md, "How PMTP was fixed"). Hidden layout keys (-inf) stay hidden."""
    B, N, P = box_coverage.shape
    L = attn_mask.shape[-1]
    bias = torch.zeros(B, 1, L, L, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
    prior = strength * (box_coverage * instance_mask[..., None]).transpose(1, 2)  # (B, P, N)
    bias[:, 0, L - P:, n_caption:n_caption + N] += prior
    return bias


# -----------------------------------------------------------------------------
# the grounding head: a phrase-conditioned DETR decoder over the image tokens


class Attention(nn.Module):
    """Multi-head attention of queries over a context (the queries themselves for self-attention),
    RMS qk-norm as in the MM-DiT, one F.scaled_dot_product_attention call."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, attn_mask=None):
        B, N, D = x.shape
        q = self.q(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, H, N, Dh)
        kv = self.kv(context).view(B, context.shape[1], 2, self.heads, D // self.heads)
        k, v = kv.permute(2, 0, 3, 1, 4)  # 2 x (B, H, P, Dh)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, N, D)


class DecoderLayer(nn.Module):
    """Pre-norm DETR decoder layer: self-attention among the queries (how two queries of one phrase
    agree on who takes which object), cross-attention to the image, MLP."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, queries, image_features, self_mask):
        h = self.norm1(queries)
        queries = queries + self.self_attn(h, h, self_mask)
        queries = queries + self.cross_attn(self.norm2(queries), image_features)
        return queries + self.mlp(self.norm3(queries))


INITIAL_BOX = (0.5, 0.5, 0.3, 0.3)  # cxcywh of a fresh head's boxes: centred, the world's typical size


class GroundingHead(nn.Module):
    """image_features (B, P, D) (position-embedded by the caller), queries (B, N, D) (one per phrase
    instance), query_mask (B, N) bool -> {"candidate_boxes": (L, B, N, K, 4) cxcywh in [0, 1],
    "candidate_logits": (L, B, N, K), "boxes": (L, B, N, 4), "logits": (L, B, N)}, one entry per
    decoder layer; the last is the prediction, the others feed the auxiliary losses.

    Each query proposes K = `candidates` boxes, each with its confidence, and its answer ("boxes",
    "logits") is its most confident candidate. With one box per query, a query unsure which of two
    objects is its own is pulled by the L1 and GIoU losses to a box between them (the regression
    mean); with several, one candidate can sit on each and the confidence chooses, as DETR's many
    queries per image do. K = 1 is DETR's one query per instance."""

    def __init__(self, dim, depth=3, heads=4, max_instances=8, candidates=1):
        super().__init__()
        self.candidates = candidates
        # a learned embedding per slot: two queries of the same phrase would otherwise be identical
        # and could only ever predict the same box (symmetry breaking); the same for a slot's candidates
        self.slot_embed = nn.Parameter(torch.randn(max_instances, dim) * 0.02)
        if candidates > 1:
            self.candidate_embed = nn.Parameter(torch.randn(candidates, dim) * 0.02)
        self.image_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)  # shared by every layer's output, as DETR's decoder norm
        self.box_head = MLP(dim, dim, 4)
        self.conf_head = nn.Linear(dim, 1)
        # a fresh head predicts INITIAL_BOX everywhere (sane boxes, finite GIoU gradients from step 0)
        nn.init.zeros_(self.box_head.fc2.weight)
        with torch.no_grad():
            self.box_head.fc2.bias.copy_(torch.logit(torch.tensor(INITIAL_BOX)))

    def forward(self, image_features, queries, query_mask):
        (B, N, _), K = queries.shape, self.candidates
        queries = queries + self.slot_embed[:N].to(queries.dtype)
        if K > 1:
            queries = (queries[:, :, None] + self.candidate_embed.to(queries.dtype)).flatten(1, 2)  # (B, N*K, D)
        image_features = self.image_norm(image_features)
        # a query reads the valid queries and itself, so a padding slot never feeds a real one and
        # no row of the softmax is empty
        valid = query_mask.repeat_interleave(K, dim=1)  # (B, N*K)
        itself = torch.eye(N * K, dtype=torch.bool, device=queries.device)
        self_mask = (valid[:, None, :] | itself)[:, None]  # (B, 1, N*K, N*K)
        boxes, logits = [], []
        for layer in self.layers:
            queries = layer(queries, image_features, self_mask)
            # the output heads in float32 even under bf16 autocast: bf16 would round a coordinate
            # near 0.5 to steps of 0.002, a pixel's fraction at R = 128, which the L1 loss would feel
            with torch.autocast(queries.device.type, enabled=False):
                h = self.norm(queries.float())
                boxes.append(self.box_head(h).sigmoid().view(B, N, K, 4))
                logits.append(self.conf_head(h).view(B, N, K))
        boxes, logits = torch.stack(boxes), torch.stack(logits)  # (L, B, N, K, 4), (L, B, N, K)
        best = logits.argmax(dim=-1, keepdim=True)  # (L, B, N, 1)
        return {"candidate_boxes": boxes, "candidate_logits": logits,
                "boxes": boxes.gather(3, best[..., None].expand(-1, -1, -1, -1, 4)).squeeze(3),
                "logits": logits.gather(3, best).squeeze(3)}


# -----------------------------------------------------------------------------
# the model


X0_T_MIN = 0.05  # the floor of t in v = (x_t - x0) / t under x0-prediction (JiT's t_eps)


@dataclass
class ModelConfig:
    res: int = 32  # image side in pixels (the model works in pixel space: no VAE at this scale)
    channels: int = 3
    patch: int = 2
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    vocab_size: int = 64  # set from the tokenizer
    max_caption_len: int = 64
    max_phrase_len: int = 12
    max_instances: int = 8
    text_depth: int = 2
    fourier_freqs: int = 8
    grounding: bool = True  # the grounding head and the task embedding; False = the generation-only model
    ground_depth: int = 2  # decoder layers of the grounding head
    ground_candidates: int = 1  # boxes each grounding query proposes, its answer the most confident (GroundingHead)
    idm: bool = False  # I-DRUID's IDM in every block (and its L_dis in the output); False = the plain model
    box_attn_bias: float = 2.0  # logit bonus of an image patch for the layout tokens whose box covers it; 0 = none
    # the levers of learning shapes fast (docs/shapes.md): off here, the model of every checkpoint
    # made before them; the training scripts turn them on
    layout_map: int = 0  # channels of the per-pixel layout map (LayoutMap), patch-embedded beside the image; 0 = none
    conv_stem: int = 0  # hidden channels of the image's convolutional patch embedding (ConvStem); 0 = one linear map per patch
    pixel_head: int = 0  # hidden channels of the output path at pixel resolution (PixelHead); 0 = linear unpatchify
    prediction: str = "v"  # what the network outputs: "v", or "x0" (JiT), turned into v = (x_t - x0) / t; the loss stays on v


class EchoGenOutput(NamedTuple):
    v: torch.Tensor  # the velocity (B, C, R, R)
    grounding: Optional[dict]  # the head's {"boxes": (L, B, N, 4) cxcywh, "logits": (L, B, N)}, or None without task
    idm_loss: torch.Tensor  # L_dis, a scalar: the mean over blocks of each one's mean over active instances; 0 without IDM


class EchoGen(nn.Module):
    config_class = ModelConfig  # what runtime.load_model builds from a checkpoint's config.json

    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.res % config.patch == 0, f"res {config.res} is not a multiple of patch {config.patch}"
        assert config.dim % config.heads == 0 and config.dim % 4 == 0, f"dim {config.dim} must divide by heads and by 4"
        assert config.prediction in ("v", "x0"), f"prediction must be 'v' or 'x0', got {config.prediction!r}"
        self.config = config
        D = config.dim
        self.grid = config.res // config.patch
        self.text = TextEncoder(config.vocab_size, max(config.max_caption_len, config.max_phrase_len),
                                D, config.text_depth, config.heads)
        self.layout = LayoutEmbedding(D, config.fourier_freqs, queries=config.grounding)
        self.patch_embed = (ConvStem(config.channels, config.conv_stem, D, config.patch) if config.conv_stem
                            else nn.Conv2d(config.channels, D, config.patch, stride=config.patch))
        if config.layout_map:
            self.layout_map = LayoutMap(D, config.layout_map)
            # no bias: an all-zero map (no boxes, a grounding row) adds nothing to the patch embedding
            self.layout_map_embed = nn.Conv2d(config.layout_map, D, config.patch, stride=config.patch, bias=False)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(self.grid, D)[None], persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.caption_embed = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        # without grounding nothing reads the condition stream after the last block (see MMDiTBlock)
        self.blocks = nn.ModuleList(
            MMDiTBlock(D, config.heads, config.mlp_ratio, cond_pre_only=i == config.depth - 1 and not config.grounding,
                       idm=config.idm)
            for i in range(config.depth))
        self.final = FinalLayer(D, config.patch, config.pixel_head or config.channels)
        if config.pixel_head:
            self.pixel_head = PixelHead(config.pixel_head + config.channels + config.layout_map, config.pixel_head,
                                        config.channels)
        if config.grounding:
            self.task_embed = nn.Embedding(2, D)  # 0 = generation, 1 = grounding
            self.grounding_head = GroundingHead(D, config.ground_depth, config.heads, config.max_instances,
                                                       config.ground_candidates)
        self._init_weights()

    def _init_weights(self):
        # DiT: xavier linears, zero adaLN and output layers -> every block starts as the identity
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if not self.config.conv_stem:  # a conv stem keeps torch's conv init
            w = self.patch_embed.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for block in self.blocks:
            for stream in (block.cond_stream, block.image_stream):
                nn.init.zeros_(stream.adaLN[-1].weight)
                nn.init.zeros_(stream.adaLN[-1].bias)
            if block.idm is not None:  # alpha = 1/2, and a fresh IDM adds nothing: the plain block's output
                for layer in (block.idm.alpha.fc2, block.idm.out):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)
        # the last layer that makes pixels starts at zero; with a pixel head that is its last conv, and the
        # final linear keeps its init so that the head's features are not all zero at the start
        for layer in (self.final.adaLN[-1], self.pixel_head.out if self.config.pixel_head else self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.config.grounding:
            # small, as DiT's class embedding: nn.Embedding's N(0, 1) would add a vector of norm
            # ~sqrt(dim) to the conditioning and drown the timestep and the caption in it
            nn.init.normal_(self.task_embed.weight, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def compile_blocks(self):
        """torch.compile the transformer blocks and the final layer in place: they hold nearly all the
        FLOPs, and compiling in place keeps state_dict keys free of `_orig_mod.` prefixes. The text
        encoder stays eager, since its sequence lengths change from batch to batch."""
        for module in [*self.blocks, self.final] + ([self.pixel_head] if self.config.pixel_head else []):
            module.compile()

    # --- conditions: computed once per sample, reused at every sampling step

    def encode_conditions(self, caption_ids, phrase_ids, boxes, instance_mask, task=None):
        """caption_ids (B, Lc), phrase_ids (B, N, Lp), boxes (B, N, 4), instance_mask (B, N); task (B,)
        0 / 1 per row packs grounding queries into the sequence (None: generation only, no queries).
        -> dict: condition tokens (B, Lc + N [+ N], D), pooled caption (B, D), and what the mask needs."""
        B, N, _ = phrase_ids.shape
        caption_tokens, caption_mask, caption_pooled = self.text(trim_padding(caption_ids))
        # only the phrases of real instances go through the text encoder: most slots are empty
        phrase_pooled = caption_pooled.new_zeros(B, N, self.config.dim)
        phrase_tokens = phrase_mask = None  # (n_instances, Lp, D), (n_instances, Lp): what IDM reads
        if instance_mask.any():
            phrase_tokens, phrase_mask, pooled = self.text(trim_padding(phrase_ids[instance_mask]))
            phrase_pooled[instance_mask] = pooled
        layout_tokens = self.layout(phrase_pooled, boxes, instance_mask)
        tokens = [caption_tokens, layout_tokens]
        if task is not None:
            tokens.append(self.layout(phrase_pooled, None, instance_mask))  # the grounding queries
        cond = {"tokens": torch.cat(tokens, dim=1), "pooled": caption_pooled, "caption_mask": caption_mask,
                "instance_mask": instance_mask, "task": task, "boxes": boxes,
                "layout_map": self.encode_layout_map(phrase_pooled, boxes, instance_mask, task)}
        if self.config.idm:
            cond["idm"] = self.idm_inputs(phrase_tokens, phrase_mask, layout_tokens, boxes, instance_mask, task)
        return cond

    def idm_inputs(self, phrase_tokens, phrase_mask, layout_tokens, boxes, instance_mask, task):
        """What the IDM of every block reads besides the image tokens, gathered once per sample for the
        M instances the image reads: real, not dropped for CFG, in a generation row (the image of a
        grounding row cannot see the layout, and ground() has no boxes). -> {"rows": (M,) the image of
        each, "keys": (M, Lp + 1, D) its phrase's tokens and its layout token, "key_mask": (M, Lp + 1),
        "layout_tokens": (M, D), "box_mask": (M, P) its box's share of each patch}."""
        active = instance_mask if task is None else instance_mask & (task != 1)[:, None]
        if boxes is None:
            active = torch.zeros_like(instance_mask)
        rows, _ = active.nonzero(as_tuple=True)
        M, D = rows.shape[0], self.config.dim
        if M == 0:  # nothing to read: empty tensors, so that the blocks run the same code
            phrase_tokens, phrase_mask = layout_tokens.new_zeros(0, 1, D), instance_mask.new_zeros(0, 1)
        else:
            keep = active[instance_mask]  # the active ones among the encoded phrases (both row-major)
            phrase_tokens, phrase_mask = phrase_tokens[keep], phrase_mask[keep]
        active_layout = layout_tokens[active]  # (M, D)
        return {"rows": rows, "layout_tokens": active_layout,
                "keys": torch.cat([phrase_tokens, active_layout[:, None]], dim=1),
                "key_mask": torch.cat([phrase_mask, phrase_mask.new_ones(M, 1)], dim=1),
                "box_mask": (patch_box_coverage(boxes[active][None], self.grid)[0] if M
                             else layout_tokens.new_zeros(0, self.grid ** 2))}

    def encode_layout_map(self, phrase_pooled, boxes, instance_mask, task):
        """The per-pixel layout map (LayoutMap) of the instances the image may read, or None without
        one. A grounding row's map is all zero (its boxes are the answer), and so is every map when
        the boxes are unknown (ground())."""
        if not self.config.layout_map:
            return None
        B, R = instance_mask.shape[0], self.config.res
        if boxes is None:
            return phrase_pooled.new_zeros(B, self.config.layout_map, R, R)
        visible = instance_mask if task is None else instance_mask & (task != 1)[:, None]
        return self.layout_map(phrase_pooled, boxes, visible, R)

    @staticmethod
    def drop_conditions(caption_ids, instance_mask, drop):
        """Classifier-free guidance: where drop (B,) is True, caption and layout vanish together
        (all-pad caption, every instance slot null)."""
        caption_ids = torch.where(drop[:, None], torch.zeros_like(caption_ids), caption_ids)
        instance_mask = instance_mask & ~drop[:, None]
        return caption_ids, instance_mask

    # --- the transformer

    def run_blocks(self, x_t, t, cond):
        """x_t (B, C, R, R), t (B,) in [0, 1] -> image tokens (B, P, D), query tokens (B, N, D) or None, c (B, D),
        and L_dis averaged over the blocks (a scalar) or None without IDM."""
        B, P = x_t.shape[0], self.grid ** 2
        image_tokens = self.patch_embed(x_t).flatten(2).transpose(1, 2) + self.pos_embed  # (B, P, D)
        if cond["layout_map"] is not None:
            image_tokens = image_tokens + self.layout_map_embed(cond["layout_map"]).flatten(2).transpose(1, 2)
        c = self.t_embed(timestep_embedding(t, 256).to(x_t.dtype)) + self.caption_embed(cond["pooled"])
        task = cond["task"]
        if self.config.grounding:
            c = c + self.task_embed(task if task is not None else torch.zeros_like(t, dtype=torch.long))
        N = cond["instance_mask"].shape[1]
        if task is None:  # generation only: every condition key except caption padding is visible
            keys = torch.ones(B, N + P, dtype=torch.bool, device=x_t.device)
            attn_mask = torch.cat([cond["caption_mask"], keys], dim=1)[:, None, None, :]  # (B, 1, 1, L)
        else:
            attn_mask = task_attention_mask(cond["caption_mask"], cond["instance_mask"], task, N, P)
        if self.config.box_attn_bias and cond["boxes"] is not None:  # ground() has no boxes
            attn_mask = box_attention_bias(attn_mask, patch_box_coverage(cond["boxes"], self.grid),
                                           cond["instance_mask"], cond["caption_mask"].shape[1], self.config.box_attn_bias)
        cond_tokens, idm_inputs, idm_losses = cond["tokens"], cond.get("idm"), []
        for block in self.blocks:
            if idm_inputs is None:
                cond_tokens, image_tokens = block(cond_tokens, image_tokens, c, attn_mask)
            else:
                cond_tokens, image_tokens, idm_loss = block(cond_tokens, image_tokens, c, attn_mask, idm_inputs)
                idm_losses.append(idm_loss)
        queries = cond_tokens[:, -N:] if task is not None else None
        return image_tokens, queries, c, torch.stack(idm_losses).mean() if idm_losses else None

    def unpatchify(self, patches):
        """(B, g*g, p*p*C) -> (B, C, R, R), C the channels per pixel of the patches"""
        B, g, p = patches.shape[0], self.grid, self.config.patch
        C = patches.shape[-1] // (p * p)
        patches = patches.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return patches.reshape(B, C, g * p, g * p)

    def output_velocity(self, image_tokens, c, x_t, t, cond):
        """The image tokens after the blocks -> v (B, C, R, R): the final layer, unpatchify, the pixel
        head if there is one, and with x0-prediction the velocity of that x0 on the straight path,
        v = (x_t - x0) / t (x_t = (1 - t) x0 + t eps). t is floored at X0_T_MIN there, as JiT does,
        so that a small t does not blow the network's error up."""
        out = self.unpatchify(self.final(image_tokens, c))
        if self.config.pixel_head:
            out = self.pixel_head(out, x_t, cond["layout_map"])
        if self.config.prediction == "x0":
            out = (x_t - out) / t.clamp(min=X0_T_MIN).view(-1, 1, 1, 1).to(out.dtype)
        return out

    def velocity(self, x_t, t, cond):
        """The generation path alone (the sampler's): v (B, C, R, R)."""
        image_tokens, _, c, _ = self.run_blocks(x_t, t, cond)
        return self.output_velocity(image_tokens, c, x_t, t, cond)

    def forward(self, x_t, t, caption_ids, phrase_ids, boxes, instance_mask, task=None):
        """Both tasks in one pass (PMTP) -> EchoGenOutput, whatever is asked. task None: the generation
        rows only, grounding None. task (B,) of 0 / 1: the head reads every row (only rows of task 1
        mean anything). L_dis is an output, not an attribute, so that DDP's wrapper passes it and a
        later call (ground) cannot overwrite it."""
        cond = self.encode_conditions(caption_ids, phrase_ids, boxes, instance_mask, task)
        image_tokens, queries, c, idm_loss = self.run_blocks(x_t, t, cond)
        v = self.output_velocity(image_tokens, c, x_t, t, cond)
        grounding = None if task is None else self.grounding_head(image_tokens, queries, instance_mask)
        return EchoGenOutput(v, grounding, idm_loss if idm_loss is not None else torch.zeros((), device=v.device))

    def ground(self, images, caption_ids, phrase_ids, instance_mask):
        """Grounding of clean images (t = 0): images (B, C, R, R) in [-1, 1] -> the head's outputs."""
        B = images.shape[0]
        task = torch.ones(B, dtype=torch.long, device=images.device)
        cond = self.encode_conditions(caption_ids, phrase_ids, None, instance_mask, task)
        image_tokens, queries, _, _ = self.run_blocks(images, torch.zeros(B, device=images.device), cond)
        return self.grounding_head(image_tokens, queries, instance_mask)
