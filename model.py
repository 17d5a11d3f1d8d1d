"""
The EchoGen model: a minimal MM-DiT (SD3's multimodal diffusion transformer) that reads a caption,
a layout (one token per instance: a phrase and a box) and a noisy image, and predicts the
rectified-flow velocity v = eps - x0 (DESIGN.md, "The model").

Built bottom-up, one screen per class, as nanoGPT's model.py is:
  RMSNorm, modulate, sinusoidal/Fourier embeddings  ->  TextEncoder  ->  LayoutEmbedding
  ->  MMDiTBlock (two streams, one joint attention)  ->  FinalLayer  ->  ModelConfig, EchoGen.

Two streams, as in SD3: the image stream (patch tokens) and the condition stream (caption
tokens followed by layout tokens). Each stream has its own weights; both meet in one
scaled-dot-product attention per block. adaLN-Zero modulation (DiT) from the timestep and the
pooled caption makes a fresh model the identity on its residual streams.
"""

import math
from dataclasses import dataclass

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


def fourier_box_embedding(boxes, n_freqs):
    """GLIGEN/CreatiLayout Fourier features of xyxy boxes: (B, N, 4) -> (B, N, 4 * 2 * n_freqs)."""
    freqs = math.pi * 2.0 ** torch.arange(n_freqs, device=boxes.device, dtype=torch.float32)
    args = boxes.float().unsqueeze(-1) * freqs  # (B, N, 4, F)
    return torch.cat([args.sin(), args.cos()], dim=-1).flatten(2)  # (B, N, 4 * 2F)


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
    """One token per instance (CreatiLayout): MLP([Fourier(box), pooled phrase]); a learned null
    token fills empty slots (and every slot when the condition is dropped for CFG)."""

    def __init__(self, dim, n_freqs):
        super().__init__()
        self.n_freqs = n_freqs
        self.mlp = nn.Sequential(nn.Linear(8 * n_freqs + dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.null, std=0.02)

    def forward(self, phrase_pooled, boxes, instance_mask):
        # phrase_pooled: (B, N, D), boxes: (B, N, 4) xyxy in [0, 1], instance_mask: (B, N) bool
        box_features = fourier_box_embedding(boxes, self.n_freqs).to(phrase_pooled.dtype)
        tokens = self.mlp(torch.cat([box_features, phrase_pooled], dim=-1))
        return torch.where(instance_mask.unsqueeze(-1), tokens, self.null.to(tokens.dtype))


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
    qkv_streams: list of (q, k, v), each (B, H, L_i, Dh); attn_mask: bool, broadcastable to
    (B, H, L, L) with L = sum L_i, True = may attend. Returns a list of (B, L_i, H*Dh)."""
    q, k, v = (torch.cat(parts, dim=2) for parts in zip(*qkv_streams))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, Dh)
    out = out.transpose(1, 2).flatten(2)  # (B, L, H*Dh)
    return list(out.split([s[0].shape[2] for s in qkv_streams], dim=1))


class MMDiTBlock(nn.Module):
    """cond_pre_only: in the last block nothing reads the condition stream's output, so (as in SD3)
    it only lends its keys and values; unused weights would also break DDP's gradient reduction."""

    def __init__(self, dim, heads, mlp_ratio, cond_pre_only=False):
        super().__init__()
        self.cond_stream = StreamWeights(dim, heads, mlp_ratio, pre_only=cond_pre_only)
        self.image_stream = StreamWeights(dim, heads, mlp_ratio)

    def forward(self, cond_tokens, image_tokens, c, attn_mask):
        """-> (cond_tokens, image_tokens); cond_tokens is None from a pre-only block."""
        cond_qkv, cond_mod = self.cond_stream.pre_attention(cond_tokens, c)
        image_qkv, image_mod = self.image_stream.pre_attention(image_tokens, c)
        cond_out, image_out = joint_attention([cond_qkv, image_qkv], attn_mask)
        cond_tokens = None if self.cond_stream.pre_only else self.cond_stream.post_attention(cond_tokens, cond_out, cond_mod)
        image_tokens = self.image_stream.post_attention(image_tokens, image_out, image_mod)
        return cond_tokens, image_tokens


class FinalLayer(nn.Module):
    """adaLN + linear to patch pixels, zero-initialized so a fresh model predicts v = 0."""

    def __init__(self, dim, patch, channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# -----------------------------------------------------------------------------
# the model


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


class EchoGen(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.res % config.patch == 0, f"res {config.res} is not a multiple of patch {config.patch}"
        assert config.dim % config.heads == 0 and config.dim % 4 == 0, f"dim {config.dim} must divide by heads and by 4"
        self.config = config
        D = config.dim
        self.grid = config.res // config.patch
        self.text = TextEncoder(config.vocab_size, max(config.max_caption_len, config.max_phrase_len),
                                D, config.text_depth, config.heads)
        self.layout = LayoutEmbedding(D, config.fourier_freqs)
        self.patch_embed = nn.Conv2d(config.channels, D, config.patch, stride=config.patch)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(self.grid, D)[None], persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.caption_embed = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(MMDiTBlock(D, config.heads, config.mlp_ratio, cond_pre_only=i == config.depth - 1)
                                    for i in range(config.depth))
        self.final = FinalLayer(D, config.patch, config.channels)
        self._init_weights()

    def _init_weights(self):
        # DiT: xavier linears, zero adaLN and output layers -> every block starts as the identity
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for block in self.blocks:
            for stream in (block.cond_stream, block.image_stream):
                nn.init.zeros_(stream.adaLN[-1].weight)
                nn.init.zeros_(stream.adaLN[-1].bias)
        for layer in (self.final.adaLN[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def compile_blocks(self):
        """torch.compile the transformer blocks and the final layer in place: they hold nearly all the
        FLOPs, and compiling in place keeps state_dict keys free of `_orig_mod.` prefixes. The text
        encoder stays eager, since its sequence lengths change from batch to batch."""
        for module in [*self.blocks, self.final]:
            module.compile()

    # --- conditions: computed once per sample, reused at every sampling step

    def encode_conditions(self, caption_ids, phrase_ids, boxes, instance_mask):
        """caption_ids (B, Lc), phrase_ids (B, N, Lp), boxes (B, N, 4), instance_mask (B, N)
        -> dict with the condition stream (B, Lc + N, D), its key mask and the pooled caption."""
        B, N, _ = phrase_ids.shape
        caption_tokens, caption_mask, caption_pooled = self.text(trim_padding(caption_ids))
        # only the phrases of real instances go through the text encoder: most slots are empty
        phrase_pooled = caption_pooled.new_zeros(B, N, self.config.dim)
        if instance_mask.any():
            _, _, pooled = self.text(trim_padding(phrase_ids[instance_mask]))  # (n_instances, D)
            phrase_pooled[instance_mask] = pooled
        layout_tokens = self.layout(phrase_pooled, boxes, instance_mask)
        layout_mask = torch.ones(B, N, dtype=torch.bool, device=boxes.device)  # null tokens are attended too
        return {"tokens": torch.cat([caption_tokens, layout_tokens], dim=1),
                "key_mask": torch.cat([caption_mask, layout_mask], dim=1),
                "pooled": caption_pooled}

    @staticmethod
    def drop_conditions(caption_ids, instance_mask, drop):
        """Classifier-free guidance: where drop (B,) is True, caption and layout vanish together
        (all-pad caption, every instance slot null)."""
        caption_ids = torch.where(drop[:, None], torch.zeros_like(caption_ids), caption_ids)
        instance_mask = instance_mask & ~drop[:, None]
        return caption_ids, instance_mask

    # --- the denoiser

    def velocity(self, x_t, t, cond):
        """x_t (B, C, R, R), t (B,) in [0, 1], cond from encode_conditions -> v (B, C, R, R)."""
        B, C, R, _ = x_t.shape
        p, g = self.config.patch, self.grid
        image_tokens = self.patch_embed(x_t).flatten(2).transpose(1, 2) + self.pos_embed  # (B, g*g, D)
        c = self.t_embed(timestep_embedding(t, 256).to(x_t.dtype)) + self.caption_embed(cond["pooled"])
        cond_tokens = cond["tokens"]
        image_keys = torch.ones(B, image_tokens.shape[1], dtype=torch.bool, device=x_t.device)
        attn_mask = torch.cat([cond["key_mask"], image_keys], dim=1)[:, None, None, :]  # (B, 1, 1, L)
        for block in self.blocks:
            cond_tokens, image_tokens = block(cond_tokens, image_tokens, c, attn_mask)
        patches = self.final(image_tokens, c)  # (B, g*g, p*p*C)
        patches = patches.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return patches.reshape(B, C, R, R)

    def forward(self, x_t, t, caption_ids, phrase_ids, boxes, instance_mask):
        cond = self.encode_conditions(caption_ids, phrase_ids, boxes, instance_mask)
        return self.velocity(x_t, t, cond)


# -----------------------------------------------------------------------------
# the generation objective


def sample_timesteps(n, generator, device="cpu"):
    """Logit-normal t (SD3): t = sigmoid(u), u ~ N(0, 1); puts most samples at mid noise."""
    return torch.sigmoid(torch.randn(n, generator=generator)).to(device)


def rectified_flow_loss(model, x0, t, noise, caption_ids, phrase_ids, boxes, instance_mask):
    """x_t = (1 - t) x0 + t eps, target v = eps - x0, mean squared error (DESIGN.md)."""
    t_ = t.view(-1, 1, 1, 1)
    x_t = (1 - t_) * x0 + t_ * noise
    v = model(x_t, t, caption_ids, phrase_ids, boxes, instance_mask)
    return F.mse_loss(v.float(), (noise - x0).float())
