"""Neural networks shared by the scripts: feature encoders, per-symbol actor-critic heads, the master network,
the supervised signal classifiers and checkpoint helpers."""

from __future__ import annotations

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
