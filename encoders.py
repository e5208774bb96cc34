"""The networks, and nothing else: the supervised signal classifiers, the feature encoders (transformer, LSTM, CNN,
MLP), `SymbolPolicy` (shared encoder, per-symbol actor-critic heads batched over symbols, action masking),
`MasterNetwork`, `ValueNorm`, parameter counting and the weight-sharing report.

Sampling, entropy and the losses belong to the algorithm and live in the training scripts; run bookkeeping
(checkpoints, logging, torchrun) lives in experiment.py.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
import torch.nn as nn

# ---------------------------------------------------------------------------------------------------------------
# Supervised signal classifiers (fitted by market_data.py on the train split; their probabilities become sl_probs).
# Input x: (N, L, F) float32 window of technical features; output: logits (N,) for "the forward return over the
# label horizon beats the threshold".
# ---------------------------------------------------------------------------------------------------------------


class SignalMLP(nn.Module):
    """Two-layer MLP on the flattened window."""

    def __init__(self, seq_len: int, num_features: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(seq_len * num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (N,)


class _SignalRNN(nn.Module):
    """One recurrent layer over the window; the last hidden state feeds a linear logit."""

    cell: type[nn.Module] = nn.LSTM

    def __init__(self, seq_len: int, num_features: int, hidden: int = 32):
        super().__init__()
        self.rnn = self.cell(num_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # (N, L, H)
        return self.head(out[:, -1]).squeeze(-1)  # (N,)


class SignalLSTM(_SignalRNN):
    cell = nn.LSTM


class SignalGRU(_SignalRNN):
    cell = nn.GRU


# ---------------------------------------------------------------------------------------------------------------
# Feature encoders. Every kind maps an observation dict with leading dims (*lead) to an embedding (*lead, output_dim):
#   technical (*lead, 24, 23), sl_probs (*lead, 3), position (*lead, 5), portfolio (*lead, 8), regime (*lead, 10).
# `action_mask` is not a feature (the heads apply it to the logits) and `directives` enter the heads, not the encoder,
# so one encoder serves both the independent and the portfolio mode. Leading dims are flattened, so (B, S, ...)
# batches of envs x symbols go through the shared encoder in one call.
# ---------------------------------------------------------------------------------------------------------------

STATE_KEYS = ("sl_probs", "position", "portfolio", "regime")  # one token each in the transformer, in this order


@dataclass
class EncoderConfig:
    """Architecture of the shared feature encoder (nested into the scripts' tyro Args as `encoder`)."""

    kind: Literal["transformer", "lstm", "cnn", "mlp"] = "transformer"
    """encoder family: the seed's transformer, or an lstm / cnn (1-D convolutions) / mlp alternative"""
    d_model: int = 256
    """width of the tokens (transformer) or of the hidden layers and channels (lstm, cnn, mlp)"""
    nhead: int = 8
    """attention heads per transformer layer"""
    num_layers: int = 4
    """transformer layers"""
    dim_feedforward: int = 1024
    """width of the transformer's feed-forward block"""
    dropout: float = 0.1
    """dropout inside the encoder (the seed's 0.1; PPO scripts pass 0.0 so the importance ratio stays exact)"""
    output_dim: int = 256
    """size of the embedding handed to the heads"""
    alt_layers: int = 2
    """recurrent layers (lstm) or convolution layers (cnn) of the alternatives"""
    cross_symbol: Literal["none", "attention"] = "none"
    """mixing across the S symbols of an env after the per-symbol encoder, before the heads: none (each symbol sees
its own observation only), or attention (each symbol attends to every symbol of its env at the same bar: their
embeddings, newest bars and lagged return correlations over the window; one residual block, CrossSymbolAttention;
docs/training.md)"""
    cross_symbol_dim: int = 32
    """width of the cross-symbol block's queries, keys and values (split over its heads); the message is projected
back to output_dim"""
    cross_symbol_heads: int = 4
    """attention heads of the cross-symbol block"""
    cross_symbol_graph: bool = True
    """with cross_symbol attention: a learned (heads, S, S) bias on the attention scores, a graph of which symbol
reads which, learned from the rewards (it ties the network to S symbols in their order); off: attention on content
and on the window's lagged correlations only, equivariant under any permutation of the symbols and open to any
number of them"""
    # Input shapes: set from the environment's observation (set_input_shapes), never flags, so that they cannot
    # disagree with the data (--data.lookback is the one lookback).
    seq_len: int = field(default=24, init=False)
    """bars in the technical window"""
    technical_dim: int = field(default=23, init=False)
    """technical features per bar"""
    sl_dim: int = field(default=3, init=False)
    """supervised signal probabilities (MLP, LSTM, GRU)"""
    position_dim: int = field(default=5, init=False)
    """position state features"""
    portfolio_dim: int = field(default=8, init=False)
    """portfolio state features"""
    regime_dim: int = field(default=10, init=False)
    """market regime features"""

    @property
    def state_dims(self) -> dict[str, int]:
        return {
            "sl_probs": self.sl_dim,
            "position": self.position_dim,
            "portfolio": self.portfolio_dim,
            "regime": self.regime_dim,
        }


def set_input_shapes(cfg: EncoderConfig, shapes: dict[str, tuple[int, ...]]) -> EncoderConfig:
    """A copy of cfg with the input shapes of an environment's observation (VecTradingCore.observation_shapes)."""
    out = copy.copy(cfg)
    out.seq_len, out.technical_dim = shapes["technical"]
    for key in ("sl_probs", "position", "portfolio", "regime"):
        setattr(out, {"sl_probs": "sl_dim"}.get(key, f"{key}_dim"), shapes[key][0])
    return out


def encoder_config_from_dict(d: dict) -> EncoderConfig:
    """The EncoderConfig stored as a dict (dataclasses.asdict, e.g. in a checkpoint's args), input shapes included."""
    cfg = EncoderConfig(**{f.name: d[f.name] for f in fields(EncoderConfig) if f.init and f.name in d})
    for f in fields(EncoderConfig):
        if not f.init and f.name in d:
            setattr(cfg, f.name, d[f.name])
    return cfg


def _flatten_obs(obs: dict[str, torch.Tensor], cfg: EncoderConfig, dtype: torch.dtype):
    """Check the encoded keys and flatten their leading dims: returns technical (N, L, F), a dict of state vectors
    (N, k) and the leading shape to restore."""
    if "technical" not in obs:
        raise KeyError(f"The observation has no 'technical' key (keys: {sorted(obs)}); pass the env's obs dict.")
    tech = obs["technical"]
    want = (cfg.seq_len, cfg.technical_dim)
    if tech.dim() < 2 or tuple(tech.shape[-2:]) != want:
        raise ValueError(
            f"obs['technical'] has shape {tuple(tech.shape)}, expected (..., {want[0]}, {want[1]}); "
            "set EncoderConfig.seq_len / technical_dim to match the data."
        )
    lead = tech.shape[:-2]
    states = {}
    for key, dim in cfg.state_dims.items():
        if key not in obs:
            raise KeyError(f"The observation has no {key!r} key (keys: {sorted(obs)}); pass the env's obs dict.")
        x = obs[key]
        if tuple(x.shape) != (*lead, dim):
            raise ValueError(
                f"obs[{key!r}] has shape {tuple(x.shape)}, expected {(*lead, dim)} (leading dims of 'technical' "
                f"plus {key}_dim={dim}); fix the observation or the EncoderConfig."
            )
        states[key] = x.reshape(-1, dim).to(dtype)
    return tech.reshape(-1, *want).to(dtype), states, lead


def _xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every linear and convolution layer (the seed's encoder init).
    Attention in-projections are Xavier by PyTorch's default; recurrent weights keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv1d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def sinusoidal_positions(num_positions: int, d_model: int) -> torch.Tensor:
    """Fixed sine/cosine position codes (Vaswani et al. 2017, section 3.5): (num_positions, d_model)."""
    pos = torch.arange(num_positions, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(num_positions, d_model)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return pe


def encoder_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for a pre-LN, batch-first, ReLU nn.TransformerEncoderLayer without dropout (eval mode, or a dropout of
    0), computed from the layer's own weights along a shorter path: the packed query-key-value projection is split by
    a view rather than by nn.MultiheadAttention's transposed copies, whose backward zero-fills and copies a (3, L, N, d)
    buffer on every pass. On one CPU thread this trains the small transformer (d_model 64, 28 tokens) about 1.3x
    faster (benchmarks/BENCHMARKS.md, "Training speed"); the parameters, their names and the result are the layer's.
    Any other layout (post-LN, GELU, sequence-first, separate key and value sizes) goes through layer(x) itself."""
    attn = layer.self_attn
    if not (layer.norm_first and attn.batch_first and layer.activation_relu_or_gelu == 1 and attn._qkv_same_embed_dim):
        return layer(x)
    N, L, d = x.shape
    heads = attn.num_heads
    qkv = nn.functional.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias)  # (N, L, 3d)
    q, k, v = qkv.view(N, L, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, heads, L, d/heads)
    a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, L, d)
    x = x + attn.out_proj(a)
    return x + layer.linear2(nn.functional.relu(layer.linear1(layer.norm2(x))))


class FeatureEncoder(nn.Module):
    """The seed's transformer: 24 technical tokens + 4 state tokens (sl_probs, position, portfolio, regime) = 28
    tokens of d_model, each key with its own linear projection; sinusoidal positions over the 28 tokens; pre-LN
    encoder layers; a final LayerNorm; mean pool over tokens; linear projection to output_dim."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.d_model % cfg.nhead != 0:
            raise ValueError(f"EncoderConfig.d_model={cfg.d_model} must be divisible by nhead={cfg.nhead}.")
        self.cfg = cfg
        self.output_dim = cfg.output_dim
        self.num_tokens = cfg.seq_len + len(STATE_KEYS)
        self.technical_proj = nn.Linear(cfg.technical_dim, cfg.d_model)
        self.state_proj = nn.ModuleDict({k: nn.Linear(d, cfg.d_model) for k, d in cfg.state_dims.items()})
        self.register_buffer("pe", sinusoidal_positions(self.num_tokens, cfg.d_model), persistent=False)
        # A plain list of layers rather than nn.TransformerEncoder: the same maths, and get_attention_weights can
        # walk the layers one by one.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.d_model, cfg.nhead, cfg.dim_feedforward, cfg.dropout, batch_first=True, norm_first=True
            )
            for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.output_proj = nn.Linear(cfg.d_model, cfg.output_dim)
        _xavier_init(self)

    def tokens(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Size]:
        """Input tokens with positions added: (N, 28, d_model), and the leading shape."""
        tech, states, lead = _flatten_obs(obs, self.cfg, self.technical_proj.weight.dtype)
        parts = [self.technical_proj(tech)]  # (N, 24, d)
        parts += [self.state_proj[k](states[k]).unsqueeze(1) for k in STATE_KEYS]  # 4 x (N, 1, d)
        return torch.cat(parts, dim=1) + self.pe, lead  # (N, 28, d)

    def forward(self, obs: dict[str, torch.Tensor], return_sequence: bool = False) -> torch.Tensor:
        """Embedding (*lead, output_dim), or the normalised token sequence (*lead, 28, d_model)."""
        x, lead = self.tokens(obs)
        exact = not self.training or self.cfg.dropout == 0.0  # the PPO scripts' case: no dropout anywhere
        for layer in self.layers:
            x = encoder_layer(layer, x) if exact else layer(x)
        x = self.norm(x)  # (N, 28, d)
        if return_sequence:
            return x.reshape(*lead, self.num_tokens, -1)
        return self.output_proj(x.mean(dim=1)).reshape(*lead, self.output_dim)

    @torch.no_grad()
    def get_attention_weights(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Self-attention probabilities of every layer and head: (*lead, num_layers, nhead, 28, 28); row i is
        where token i looks (tokens 0-23 are the bars, oldest first, then sl_probs, position, portfolio, regime).
        Call in eval mode: in train mode PyTorch returns the weights after attention dropout."""
        x, lead = self.tokens(obs)
        weights = []
        for layer in self.layers:
            h = layer.norm1(x)  # pre-LN: attention sees the normalised stream
            _, w = layer.self_attn(h, h, h, need_weights=True, average_attn_weights=False)  # (N, heads, 28, 28)
            weights.append(w)
            x = layer(x)
        return torch.stack(weights, dim=1).reshape(*lead, len(self.layers), self.cfg.nhead, *weights[0].shape[-2:])


class _StateProjection(nn.Module):
    """Concatenated state vectors (sl_probs, position, portfolio, regime) -> (N, d_model), for the alternatives."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(sum(cfg.state_dims.values()), cfg.d_model), nn.GELU())

    def forward(self, states: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(torch.cat([states[k] for k in STATE_KEYS], dim=-1))


def _fuse_head(cfg: EncoderConfig) -> nn.Sequential:
    """[sequence summary, state] (N, 2 d_model) -> embedding (N, output_dim)."""
    return nn.Sequential(
        nn.Linear(2 * cfg.d_model, cfg.d_model),
        nn.GELU(),
        nn.Dropout(cfg.dropout),
        nn.LayerNorm(cfg.d_model),
        nn.Linear(cfg.d_model, cfg.output_dim),
    )


class LSTMEncoder(nn.Module):
    """LSTM over the 24 bars; its last hidden state is fused with the projected state vector."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.output_dim
        self.rnn = nn.LSTM(
            cfg.technical_dim,
            cfg.d_model,
            num_layers=cfg.alt_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.alt_layers > 1 else 0.0,
        )
        self.state = _StateProjection(cfg)
        self.fuse = _fuse_head(cfg)
        _xavier_init(self)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        tech, states, lead = _flatten_obs(obs, self.cfg, self.fuse[0].weight.dtype)
        out, _ = self.rnn(tech)  # (N, 24, d)
        z = torch.cat([out[:, -1], self.state(states)], dim=-1)  # (N, 2d)
        return self.fuse(z).reshape(*lead, self.output_dim)


class CNNEncoder(nn.Module):
    """1-D convolutions over the 24 bars (kernel 3, dilations 1, 2, 4, ...; the window is already causal, so the
    padding may look both ways), mean-pooled over time and fused with the projected state vector."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.output_dim
        layers: list[nn.Module] = []
        channels = cfg.technical_dim
        for i in range(cfg.alt_layers):
            dilation = 2**i
            layers += [nn.Conv1d(channels, cfg.d_model, 3, padding=dilation, dilation=dilation), nn.GELU()]
            channels = cfg.d_model
        self.conv = nn.Sequential(*layers)
        self.state = _StateProjection(cfg)
        self.fuse = _fuse_head(cfg)
        _xavier_init(self)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        tech, states, lead = _flatten_obs(obs, self.cfg, self.fuse[0].weight.dtype)
        h = self.conv(tech.transpose(1, 2))  # (N, d, 24): channels first for Conv1d
        z = torch.cat([h.mean(dim=-1), self.state(states)], dim=-1)  # (N, 2d)
        return self.fuse(z).reshape(*lead, self.output_dim)


class MLPEncoder(nn.Module):
    """Fast baseline: the flattened window and the state vectors through a two-hidden-layer MLP."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.output_dim
        in_dim = cfg.seq_len * cfg.technical_dim + sum(cfg.state_dims.values())
        self.net = nn.Sequential(
            nn.Linear(in_dim, cfg.d_model),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_model, cfg.d_model),
            nn.GELU(),
            nn.LayerNorm(cfg.d_model),
            nn.Linear(cfg.d_model, cfg.output_dim),
        )
        _xavier_init(self)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        tech, states, lead = _flatten_obs(obs, self.cfg, self.net[0].weight.dtype)
        z = torch.cat([tech.flatten(1)] + [states[k] for k in STATE_KEYS], dim=-1)  # (N, 24*23 + 26)
        return self.net(z).reshape(*lead, self.output_dim)


ENCODERS = {"transformer": FeatureEncoder, "lstm": LSTMEncoder, "cnn": CNNEncoder, "mlp": MLPEncoder}


# ---------------------------------------------------------------------------------------------------------------
# Mixing across symbols (the graph module): per-symbol embeddings (*lead, S, D) -> (*lead, S, D), the symbol axis kept.
# ---------------------------------------------------------------------------------------------------------------


RET_1 = 0  # column of ret_1 (the bar's log return, normalised) in the technical features (market_data.FEATURE_NAMES)


def lagged_correlation(returns: torch.Tensor) -> torch.Tensor:
    """returns (..., S, L), a window of L bars per symbol -> (..., S, S): entry (i, j) is the correlation of symbol
    i's return with symbol j's return one bar earlier, corr(r_i[t], r_j[t - 1]) over the window's L - 1 pairs, times
    sqrt(L - 1): in standard errors, about N(0, 1) for unrelated symbols. A flat window gives 0."""
    y, x = returns[..., 1:], returns[..., :-1]  # (..., S, L - 1): r[t] and r[t - 1]
    y = y - y.mean(-1, keepdim=True)
    x = x - x.mean(-1, keepdim=True)
    y = y / y.norm(dim=-1, keepdim=True).clamp(min=1e-3)
    x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-3)
    return (y @ x.transpose(-1, -2)) * math.sqrt(y.shape[-1])


class CrossSymbolAttention(nn.Module):
    """One pre-LN multi-head attention block across the S symbols of each env, between the per-symbol encoder and
    the heads: z (*lead, S, D) -> z + W_o softmax(q k^T / sqrt(d_head) + G + beta Z) v (Vaswani et al. 2017, eq. 1).

    - q, k, v (width W = cfg.cross_symbol_dim, split over the heads; W_o maps the message back to D) are linear in
      [LayerNorm(z), the symbol's newest bar (F technical features)]: another symbol's last return reaches the keys
      and values directly, without the encoder having to learn to carry it.
    - G (heads, S, S), with cfg.cross_symbol_graph: a learned bias, symbol i's prior on reading symbol j whatever the
      content. It lets a follower learn "my leader is symbol 0" without being told the map, but ties the block to S
      symbols in their order (equivariant only when G is permuted with them).
    - Z (*lead, S, S): lagged_correlation of every symbol's ret_1 over the observation's window (corr(r_i[t],
      r_j[t - 1]) in standard errors), weighted by a learned beta per head: a causal rolling lead-lag graph computed
      from the data in the window, equivariant and open to any S.

    Row i is where symbol i looks at the same bar, its own column included; nothing crosses the leading axes (envs,
    bars), so the block is as causal as the observation, whose windows end at the current bar. W_o, G and beta start
    at zero: a new block is the identity, so the policy starts as the per-symbol one and learns to mix. Cost per env
    in multiply-adds: 3 S (D + F) W + S W D for the projections, 2 S^2 W for the scores and the mix, S^2 L for Z
    (docs/training.md)."""

    def __init__(self, cfg: EncoderConfig, num_symbols: int):
        super().__init__()
        width, heads = cfg.cross_symbol_dim, cfg.cross_symbol_heads
        if width % heads != 0:
            raise ValueError(
                f"EncoderConfig.cross_symbol_dim={width} must be a multiple of cross_symbol_heads={heads}."
            )
        self.num_heads, self.num_symbols, self.width = heads, num_symbols, width
        self.norm = nn.LayerNorm(cfg.output_dim)
        self.qkv = nn.Linear(cfg.output_dim + cfg.technical_dim, 3 * width)
        self.out = nn.Linear(width, cfg.output_dim)
        _xavier_init(self)
        nn.init.zeros_(self.out.weight)
        self.graph = nn.Parameter(torch.zeros(heads, num_symbols, num_symbols)) if cfg.cross_symbol_graph else None
        self.lag_weight = nn.Parameter(torch.zeros(heads, 1, 1))  # beta

    def _attend(self, z: torch.Tensor, technical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention probabilities (N, heads, S, S) and values (N, heads, S, d_head), the leading dims flattened."""
        S, D = z.shape[-2:]
        if self.graph is not None and S != self.num_symbols:
            raise ValueError(
                f"The input has {S} symbols but the cross-symbol graph was built for {self.num_symbols}; build "
                "SymbolPolicy with num_symbols matching the env, or set EncoderConfig.cross_symbol_graph=False."
            )
        h, d_head = self.num_heads, self.width // self.num_heads
        tech = technical.reshape(-1, S, *technical.shape[-2:]).to(z.dtype)  # (N, S, L, F)
        x = torch.cat([self.norm(z.reshape(-1, S, D)), tech[:, :, -1]], dim=-1)  # (N, S, D + F)
        q, k, v = self.qkv(x).reshape(-1, S, 3, h, d_head).permute(2, 0, 3, 1, 4)  # 3 x (N, heads, S, d_head)
        lag = lagged_correlation(tech[..., RET_1]).unsqueeze(1)  # (N, 1, S, S)
        bias = self.lag_weight * lag if self.graph is None else torch.addcmul(self.graph, self.lag_weight, lag)
        # (N * heads, S, S): the bias added inside the matmul; the (N, heads, S, S) passes are most of the cost at
        # large S, so there are as few of them as possible.
        q = (q / math.sqrt(d_head)).reshape(-1, S, d_head)
        scores = torch.baddbmm(bias.reshape(-1, S, S), q, k.reshape(-1, S, d_head).transpose(1, 2))
        return torch.softmax(scores, dim=-1).reshape(-1, h, S, S), v

    def forward(self, z: torch.Tensor, technical: torch.Tensor) -> torch.Tensor:
        """z (*lead, S, D) and the observation's technical windows (*lead, S, L, F) -> (*lead, S, D)."""
        w, v = self._attend(z, technical)
        mixed = (w @ v).transpose(1, 2).reshape(*z.shape[:-1], self.width)  # (N, S, heads, d_head) -> (*lead, S, W)
        return z + self.out(mixed)

    @torch.no_grad()
    def attention_weights(self, z: torch.Tensor, technical: torch.Tensor) -> torch.Tensor:
        """Where each symbol looks: (*lead, heads, S, S), rows summing to 1 (row i: symbol i's weights on every j)."""
        w, _ = self._attend(z, technical)
        return w.reshape(*z.shape[:-2], *w.shape[1:])


def make_encoder(cfg: EncoderConfig) -> nn.Module:
    """The encoder named by cfg.kind; every kind maps an obs dict (*lead, ...) to (*lead, cfg.output_dim)."""
    if cfg.kind not in ENCODERS:
        raise ValueError(f"EncoderConfig.kind={cfg.kind!r} is unknown; choose one of {sorted(ENCODERS)}.")
    return ENCODERS[cfg.kind](cfg)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in module (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------------------------
# Actor-critic heads batched over symbols and the masked categorical policy.
# ---------------------------------------------------------------------------------------------------------------

NUM_ACTIONS = 7
MASKED_LOGIT = -1e8  # finite: softmax gives exactly 0 for it in float32, and no inf - inf can make a NaN


class BatchedMLP(nn.Module):
    """num_heads independent MLPs with weights (H, in, out), applied to x (..., S, in) with one einsum (H == S), or
    one MLP applied to every symbol (H == 1). ReLU between layers; orthogonal init with gain sqrt(2) for hidden
    layers and `out_gain` for the last one (CleanRL's layer_init, per head)."""

    def __init__(self, num_heads: int, sizes: list[int], out_gain: float):
        super().__init__()
        self.num_heads = num_heads
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            w = torch.empty(num_heads, n_in, n_out)
            gain = out_gain if i == len(sizes) - 2 else math.sqrt(2)
            for h in range(num_heads):
                # Orthogonal in nn.Linear's (out, in) layout, stored transposed as (in, out) for the einsum.
                w[h] = nn.init.orthogonal_(torch.empty(n_out, n_in), gain=gain).T
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(num_heads, n_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., S, in) -> (..., S, out)."""
        if self.num_heads > 1 and x.shape[-2] != self.num_heads:
            raise ValueError(
                f"The input has {x.shape[-2]} symbols but the per-symbol heads were built for {self.num_heads}; "
                "build SymbolPolicy with num_symbols matching the env, or use shared_heads=True."
            )
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if self.num_heads == 1:
                x = x @ w[0] + b[0]
            else:
                x = torch.einsum("...si,sio->...so", x, w) + b  # (..., S, out)
            if i < n - 1:
                x = torch.relu(x)
        return x


def mask_logits(logits: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Replace the logits of disallowed actions (mask == 0, any int or bool dtype) with MASKED_LOGIT."""
    return torch.where(action_mask.to(logits.device) != 0, logits, torch.full_like(logits, MASKED_LOGIT))


class SymbolPolicy(nn.Module):
    """Actor-critic for S symbol agents: one shared encoder, per-symbol actor (emb -> 256 -> 128 -> 7) and critic
    (emb -> 256 -> 128 -> 1) heads batched as (S, in, out) weights, or one pair of heads for all symbols
    (shared_heads=True, which also accepts any number of symbols). With encoder.cross_symbol="attention" a
    CrossSymbolAttention block mixes the S embeddings of each env between the encoder and the heads.

    Directives: with directive_dim > 0, obs["directives"] (B, S, directive_dim) is concatenated to the embedding
    before the heads (the master's orders change the decision, not the market view); with directive_dim == 0 the key
    is ignored. The action mask obs["action_mask"] (B, S, 7) is applied to the logits (masked = -1e8).
    """

    def __init__(
        self,
        num_symbols: int,
        encoder: EncoderConfig,
        shared_heads: bool = False,
        directive_dim: int = 0,
        actor_gain: float = 0.1,
        hidden: tuple[int, ...] = (256, 128),
        num_actions: int = NUM_ACTIONS,
    ):
        super().__init__()
        self.num_symbols = num_symbols
        self.directive_dim = directive_dim
        self.num_actions = num_actions
        self.encoder = make_encoder(encoder)
        num_heads = 1 if shared_heads else num_symbols
        in_dim = encoder.output_dim + directive_dim
        self.actor = BatchedMLP(num_heads, [in_dim, *hidden, num_actions], out_gain=actor_gain)
        self.critic = BatchedMLP(num_heads, [in_dim, *hidden, 1], out_gain=1.0)
        # Built after the heads, so that a seed gives the encoder and heads the weights it gives them without it.
        self.cross = None
        if encoder.cross_symbol == "attention":
            self.cross = CrossSymbolAttention(encoder, num_symbols)
        elif encoder.cross_symbol != "none":
            raise ValueError(f"EncoderConfig.cross_symbol={encoder.cross_symbol!r} is unknown; use none or attention.")

    def embed(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embedding (B, S, output_dim) that the heads read: the shared encoder's, then the cross-symbol block's
        when there is one; e.g. for the master network's pooling."""
        z = self.encoder(obs)  # (B, S, D)
        return z if self.cross is None else self.cross(z, obs["technical"])

    def _head_input(self, obs: dict[str, torch.Tensor], z: torch.Tensor | None = None) -> torch.Tensor:
        z = self.embed(obs) if z is None else z  # (B, S, D)
        if self.directive_dim > 0:
            if "directives" not in obs:
                raise KeyError(
                    f"SymbolPolicy was built with directive_dim={self.directive_dim} but the observation has no "
                    "'directives' key; run the env in portfolio mode or build the policy with directive_dim=0."
                )
            d = obs["directives"]
            if d.shape != (*z.shape[:-1], self.directive_dim):
                raise ValueError(
                    f"obs['directives'] has shape {tuple(d.shape)}, expected {(*z.shape[:-1], self.directive_dim)}."
                )
            z = torch.cat([z, d.to(z.dtype)], dim=-1)  # (B, S, D + directive_dim)
        return z

    def _masked(self, obs: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        if "action_mask" not in obs:
            raise KeyError("The observation has no 'action_mask' key; the env's mask is required to pick actions.")
        mask = obs["action_mask"]
        if mask.shape != logits.shape:
            raise ValueError(f"obs['action_mask'] has shape {tuple(mask.shape)}, expected {tuple(logits.shape)}.")
        return mask_logits(logits, mask)

    def forward(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked logits (B, S, 7) and value (B, S) from one encoder pass."""
        return self.heads(obs, self.embed(obs))

    def heads(self, obs: dict[str, torch.Tensor], z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward from an embedding z = embed(obs) already computed (a caller that reads z too, e.g. an auxiliary
        loss, pays one encoder pass)."""
        z = self._head_input(obs, z)
        return self._masked(obs, self.actor(z)), self.critic(z).squeeze(-1)

    def get_value(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.critic(self._head_input(obs)).squeeze(-1)  # (B, S)

    def get_logits(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._masked(obs, self.actor(self._head_input(obs)))  # (B, S, 7)


def weight_sharing_report(num_symbols: int, encoder: EncoderConfig, directive_dim: int = 0, **policy_kw) -> dict:
    """Parameter counts for num_symbols agents: one shared encoder + per-symbol heads (this module's layout), every
    agent with its own encoder and heads (no sharing), and one encoder + one pair of heads (shared_heads=True)."""
    one = SymbolPolicy(1, encoder, directive_dim=directive_dim, **policy_kw)
    enc = count_parameters(one.encoder)
    heads = count_parameters(one.actor) + count_parameters(one.critic)
    shared = enc + num_symbols * heads
    unshared = num_symbols * (enc + heads)
    return {
        "kind": encoder.kind,
        "num_symbols": num_symbols,
        "encoder": enc,
        "heads_per_symbol": heads,
        "one_agent": enc + heads,
        "shared_encoder_total": shared,
        "no_sharing_total": unshared,
        "shared_heads_total": enc + heads,
        "saving_fraction": 1.0 - shared / unshared,
    }


# ---------------------------------------------------------------------------------------------------------------
# Master network (portfolio manager for MAPPO) and the value normaliser of its centralised critic.
# ---------------------------------------------------------------------------------------------------------------

DIRECTIVE_SHAPE = (5, 4, 3)  # risk multiplier x (position cap, open-position limit) level x regime mode
NUM_DIRECTIVES = math.prod(DIRECTIVE_SHAPE)  # 60
HEAD_OFFSETS = tuple(sum(DIRECTIVE_SHAPE[:h]) for h in range(len(DIRECTIVE_SHAPE)))  # each head's first logit


def joint_logprobs(head_logits: torch.Tensor) -> torch.Tensor:
    """Logits of the three directive heads concatenated (..., 5 + 4 + 3) -> joint log-probabilities (..., 60),
    row-major over DIRECTIVE_SHAPE: log p(risk) + log p(concentration) + log p(mode) (independent heads)."""
    r, c, m = (torch.log_softmax(h.float(), -1) for h in torch.split(head_logits, DIRECTIVE_SHAPE, -1))
    return (r[..., :, None, None] + c[..., None, :, None] + m[..., None, None, :]).flatten(-3)


def unravel_directive(index: torch.Tensor) -> torch.Tensor:
    """Joint directive index (...) -> grid coordinates (..., 3), row-major over DIRECTIVE_SHAPE."""
    return torch.stack(torch.unravel_index(index.long(), DIRECTIVE_SHAPE), dim=-1)


def _mlp(sizes: list[int], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        lin = nn.Linear(n_in, n_out)
        last = i == len(sizes) - 2
        nn.init.orthogonal_(lin.weight, gain=out_gain if last else math.sqrt(2))
        nn.init.zeros_(lin.bias)
        layers += [lin] if last else [lin, nn.ReLU()]
    return nn.Sequential(*layers)


class MasterNetwork(nn.Module):
    """Actor-critic of the master agent, which picks one of the 60 directives of the 5 x 4 x 3 grid per env.

    Inputs (B = envs):
      symbol_embeddings (B, S, D): per-symbol embeddings, e.g. SymbolPolicy.embed(obs) (detach them if the symbol
          encoder is not meant to learn from the master's loss);
      global_features (B, G): portfolio and regime features plus the current directive (one-hot or values),
          assembled by the script;
      state (B, state_dim), only when state_dim > 0: the env's global state (VecTradingCore.state()) for the
          centralised critic; the actor never sees it;
      symbol_mask (B, S) bool, optional: symbols to pool over (e.g. tradable ones); all by default.

    The symbols are pooled by mean and max over S, so one network serves any universe size. The actor is factored:
    three independent heads (risk 5, concentration 4, regime mode 3 logits), and the joint log-probability of a
    directive is the sum of its three coordinates' log-probabilities (`joint_logprobs`). forward() returns those
    joint log-probabilities (B, 60), which are valid logits for one Categorical(60): sampling, PPO's ratio and the
    masked-policy helper stay those of one categorical, while each coordinate learns from every decision (a joint
    60-way softmax spreads ~2,000 decisions over 60 arms) and has an entropy of its own (`head_entropies`, for an
    entropy target per head). factored=False keeps the joint 60-way actor. unravel_directive maps an index to grid
    coordinates.
    """

    def __init__(
        self,
        embed_dim: int,
        global_dim: int,
        state_dim: int = 0,
        hidden: tuple[int, ...] = (256, 256),
        actor_gain: float = 0.01,
        factored: bool = True,
        actor_hidden: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self.embed_dim, self.global_dim, self.state_dim, self.factored = embed_dim, global_dim, state_dim, factored
        pooled = 2 * embed_dim + global_dim
        actor_hidden = tuple(hidden if actor_hidden is None else actor_hidden)  # (): a linear actor
        out = sum(DIRECTIVE_SHAPE) if factored else NUM_DIRECTIVES
        self.actor = _mlp([pooled, *actor_hidden, out], out_gain=actor_gain)
        self.critic = _mlp([pooled + state_dim, *hidden, 1], out_gain=1.0)
        # global_features enter as (g - input_shift) / input_scale (set_input_norm; the identity by default), saved
        # with the weights so that a loaded master reads its inputs as it was trained to
        self.register_buffer("input_shift", torch.zeros(global_dim))
        self.register_buffer("input_scale", torch.ones(global_dim))
        # the coordinates each factored head may pick (risk 5, concentration 4, mode 3); pin_heads narrows them
        self.register_buffer("allowed", torch.ones(sum(DIRECTIVE_SHAPE), dtype=torch.bool))

    def pin_heads(self, directive: int, heads: tuple[int, ...]) -> None:
        """Pin the factored heads `heads` (0 risk, 1 concentration, 2 mode) to the coordinates of directive index
        `directive`: their other logits are MASKED_LOGIT, so those heads always pick that coordinate, with entropy 0
        and no gradient; the free heads choose as before. Saved with the weights (a buffer)."""
        if not self.factored:
            raise ValueError("pin_heads needs the factored actor (factored=True).")
        coords = unravel_directive(torch.tensor(int(directive))).tolist()
        self.allowed.fill_(True)  # every earlier pin or restriction undone
        for h in heads:
            self.restrict_head(h, [coords[h]])

    def set_input_norm(self, shift, scale) -> None:
        """Standardise the global features: each column enters as (g - shift) / scale (global_dim each)."""
        shift, scale = (torch.as_tensor(x, dtype=torch.float32).reshape(self.global_dim) for x in (shift, scale))
        if not bool((scale > 0).all()):
            raise ValueError("set_input_norm: every scale must be positive.")
        self.input_shift.copy_(shift)
        self.input_scale.copy_(scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before the standardisation existed load with the identity
        state_dict.setdefault(prefix + "input_shift", torch.zeros_like(self.input_shift))
        state_dict.setdefault(prefix + "input_scale", torch.ones_like(self.input_scale))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def restrict_head(self, head: int, coords) -> None:
        """Let factored head `head` pick only the coordinates `coords` (the others masked, as pin_heads does; saved
        with the weights)."""
        if not self.factored:
            raise ValueError("restrict_head needs the factored actor (factored=True).")
        keep = torch.zeros(DIRECTIVE_SHAPE[head], dtype=torch.bool)
        keep[torch.as_tensor(list(coords), dtype=torch.long)] = True
        self.allowed[HEAD_OFFSETS[head] : HEAD_OFFSETS[head] + DIRECTIVE_SHAPE[head]] &= keep

    def free_heads(self) -> list[bool]:
        """Per head (risk, concentration, mode): whether it still chooses (more than one allowed coordinate)."""
        return [bool(a.sum() > 1) for a in torch.split(self.allowed, DIRECTIVE_SHAPE)]

    def _head_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        logits = self.actor(pooled)
        return logits.masked_fill(~self.allowed, MASKED_LOGIT) if self.factored else logits

    def _pool(self, emb: torch.Tensor, global_features: torch.Tensor, symbol_mask: torch.Tensor | None):
        if emb.dim() != 3 or emb.shape[-1] != self.embed_dim:
            raise ValueError(f"symbol_embeddings has shape {tuple(emb.shape)}, expected (B, S, {self.embed_dim}).")
        if global_features.shape != (emb.shape[0], self.global_dim):
            raise ValueError(
                f"global_features has shape {tuple(global_features.shape)}, expected ({emb.shape[0]}, "
                f"{self.global_dim}); build MasterNetwork with global_dim matching the features."
            )
        if symbol_mask is None:
            mean, peak = emb.mean(dim=1), emb.amax(dim=1)  # (B, D) each
        else:
            m = symbol_mask.to(emb.device).bool().unsqueeze(-1)  # (B, S, 1)
            count = m.sum(dim=1)  # (B, 1)
            mean = (emb * m).sum(dim=1) / count.clamp(min=1)
            # An env with no symbol in the mask pools to zeros rather than -inf.
            peak = torch.where(count > 0, emb.masked_fill(~m, -torch.inf).amax(dim=1), torch.zeros_like(mean))
        glob = (global_features.to(emb.dtype) - self.input_shift) / self.input_scale
        return torch.cat([mean, peak, glob], dim=-1)  # (B, 2D + G)

    def _critic_input(self, pooled: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        if self.state_dim == 0:
            return pooled
        if state is None or state.shape != (pooled.shape[0], self.state_dim):
            got = None if state is None else tuple(state.shape)
            raise ValueError(f"state has shape {got}, expected ({pooled.shape[0]}, {self.state_dim}) (env.state()).")
        return torch.cat([pooled, state.to(pooled.dtype)], dim=-1)

    def forward(self, symbol_embeddings, global_features, state=None, symbol_mask=None):
        """Directive logits (B, 60) (factored: the joint log-probabilities) and value (B,)."""
        pooled = self._pool(symbol_embeddings, global_features, symbol_mask)
        logits = self._head_logits(pooled)
        if self.factored:
            logits = joint_logprobs(logits)
        return logits, self.critic(self._critic_input(pooled, state)).squeeze(-1)

    def head_entropies(self, symbol_embeddings, global_features, symbol_mask=None) -> torch.Tensor:
        """Factored actor only: each head's entropy normalised by log(its size) (B, 3), risk, concentration, mode
        (1 = uniform, 0 = one choice)."""
        heads = torch.split(
            self._head_logits(self._pool(symbol_embeddings, global_features, symbol_mask)), DIRECTIVE_SHAPE, -1
        )
        return torch.stack(
            [torch.distributions.Categorical(logits=h).entropy() / math.log(h.shape[-1]) for h in heads], -1
        )

    def get_value(self, symbol_embeddings, global_features, state=None, symbol_mask=None) -> torch.Tensor:
        pooled = self._pool(symbol_embeddings, global_features, symbol_mask)
        return self.critic(self._critic_input(pooled, state)).squeeze(-1)  # (B,)


class ValueNorm(nn.Module):
    """Running mean and variance of the critic's targets (Chan et al.'s parallel update over batches). The critic
    predicts normalised values; GAE uses denormalised ones (MAPPO's ValueNorm, PopArt without the output rescale)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))
        self.register_buffer("count", torch.full((), 1e-4))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1).double()
        n, mean, var = x.numel(), x.mean(), x.var(unbiased=False)
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean.copy_(self.mean + delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / torch.sqrt(self.var + 1e-8)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sqrt(self.var + 1e-8) + self.mean


def random_observation(*lead: int, seed: int = 0, directives: int = 0, mask: str = "random") -> dict[str, torch.Tensor]:
    """A random observation dict with leading dims `lead`, laid out as the environment returns it (for tests,
    benchmarks and examples). mask "random": each action allowed with probability 1/2 (HOLD always); "all": every
    action allowed. directives > 0 adds a (lead, directives) directive block."""
    g = torch.Generator().manual_seed(seed)
    obs = {
        "technical": torch.randn(*lead, 24, 23, generator=g),
        "sl_probs": torch.rand(*lead, 3, generator=g),
        "position": torch.randn(*lead, 5, generator=g),
        "portfolio": torch.randn(*lead, 8, generator=g),
        "regime": torch.randn(*lead, 10, generator=g),
    }
    if mask == "random":
        m = torch.randint(0, 2, (*lead, NUM_ACTIONS), generator=g, dtype=torch.int8)
        m[..., 0] = 1  # HOLD is always allowed
    else:
        m = torch.ones(*lead, NUM_ACTIONS, dtype=torch.int8)
    obs["action_mask"] = m
    if directives:
        obs["directives"] = torch.randn(*lead, directives, generator=g)
    return obs
