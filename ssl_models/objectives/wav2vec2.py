"""wav2vec 2.0: mask spans of the conv frames, and pick each masked frame's quantised code out of distractors."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.audio import AudioAugment, augment_waveforms, waveforms
from ssl_models.objectives.base import AudioObjective
from ssl_models.rng import rand


# --------------------------------------------------------------------------- span masking

def num_mask_spans(length: int, frames: int, mask_prob: float, mask_length: int, min_masks: int,
                   epsilon: float) -> int:
    """Spans to mask in an utterance of ``length`` valid frames (of ``frames`` in the batch):
    ``int(mask_prob · length / mask_length + ε)``, at least ``min_masks``, at most ``frames // mask_length``
    and ``length − mask_length + 1`` (the rules of transformers' ``_compute_mask_indices``)."""
    n = max(int(mask_prob * length / mask_length + epsilon), min_masks)
    if n * mask_length > frames:
        n = frames // mask_length
    if length - (mask_length - 1) < n:
        n = max(length - (mask_length - 1), 0)
    return n


def draw_span_starts(batch: int, frames: int, mask_prob: float, mask_length: int, min_masks: int = 0,
                     lengths: Optional[Sequence[int]] = None, generator: Optional[torch.Generator] = None,
                     device=None) -> tuple[torch.Tensor, list[int], float]:
    """The random part of :func:`span_mask`: one ε ~ U[0, 1) for the batch (as transformers and fairseq
    draw it for unpadded batches), then per utterance ``n_b`` distinct span starts uniform in
    [0, length_b − mask_length] (a uniformly ordered sample without replacement, like ``np.random.choice``).
    Rows are padded to the longest with their first start (transformers' dummy index), or with
    ``frames − 1`` where ``n_b = 0``.

    Shape: → starts (B, n_max) long on ``device``, counts [n_b] * B, ε.
    """
    if mask_length < 1 or mask_length > frames:
        raise ValueError(f"mask_length must be in [1, frames={frames}], got {mask_length}")
    lengths = [frames] * batch if lengths is None else [int(n) for n in lengths]
    if len(lengths) != batch or min(lengths) < 0 or max(lengths) > frames:
        raise ValueError(f"lengths must be {batch} ints in [0, {frames}], got {lengths}")
    epsilon = float(rand(1, generator)[0])
    counts = [num_mask_spans(n, frames, mask_prob, mask_length, min_masks, epsilon) for n in lengths]
    n_max = num_mask_spans(frames, frames, mask_prob, mask_length, min_masks, epsilon)
    n_max = max([n_max] + counts)
    if n_max == 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=device), counts, epsilon
    slots = frames - mask_length + 1
    keys = rand((batch, slots), generator)                                         # (B, S) on the CPU
    valid = torch.arange(slots)[None] < (torch.tensor(lengths)[:, None] - mask_length + 1)
    order = torch.where(valid, keys, 2.0).argsort(dim=1)[:, :n_max]             # random order of the valid starts
    count = torch.tensor(counts)[:, None]
    dummy = torch.where(count > 0, order[:, :1], frames - 1)
    starts = torch.where(torch.arange(n_max)[None] < count, order, dummy)
    return starts.to(device if device is not None else "cpu"), counts, epsilon


def spans_to_mask(starts: torch.Tensor, frames: int, mask_length: int) -> torch.Tensor:
    """Frames ``[s, s + mask_length)`` of every start s (spans may overlap; clipped at the last frame).

    Shape: starts (B, n) long → (B, frames) bool.
    """
    b = starts.shape[0]
    mask = torch.zeros(b, frames, dtype=torch.bool, device=starts.device)
    if starts.numel():
        idx = (starts[:, :, None] + torch.arange(mask_length, device=starts.device)).flatten(1).clamp(max=frames - 1)
        mask.scatter_(1, idx, True)
    return mask


def span_mask(batch: int, frames: int, mask_prob: float, mask_length: int, min_masks: int = 0,
              lengths: Optional[Sequence[int]] = None, generator: Optional[torch.Generator] = None,
              device=None) -> torch.Tensor:
    """wav2vec 2.0's time mask (transformers' ``_compute_mask_indices`` on a ``torch.Generator``).
    ``lengths`` (valid frames per utterance, right padding) keeps every span out of the padding.

    Shape: → (B, frames) bool.
    """
    starts, _, _ = draw_span_starts(batch, frames, mask_prob, mask_length, min_masks, lengths, generator, device)
    return spans_to_mask(starts, frames, mask_length)


# --------------------------------------------------------------------------- distractors

def draw_negative_ranks(mask: torch.Tensor, num_negatives: int,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The random part of :func:`sample_negatives`: for every frame, ``num_negatives`` ranks uniform in
    [0, M_b − 2] (M_b masked frames in utterance b), as transformers' ``np.random.randint(0, M_b − 1)``.

    Shape: mask (B, T) bool → (B, T, K) long on mask's device.
    """
    b, t = mask.shape
    m = mask.sum(1)
    if bool((m < 2).any()):
        raise ValueError(f"wav2vec2 draws distractors from the other masked frames of an utterance: every "
                         f"utterance needs at least 2 masked frames, got {m.tolist()}")
    u = rand((b, t, num_negatives), generator, mask.device)
    top = (m - 1)[:, None, None]
    return torch.minimum((u * top).long(), top - 1)


def negatives_from_ranks(mask: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Map ranks to frames: rank r of masked frame j (its place among the masked frames) is shifted
    past j (``r += r >= j``, so the positive never comes back and the rest stay uniform), then read
    in the list of masked frames. Unmasked rows point at their own frame (unused).

    Shape: mask (B, T) bool, ranks (B, T, K) long → (B, T, K) long frame indices in [0, T).
    """
    b, t = mask.shape
    j = mask.long().cumsum(1) - 1                                                  # place among the masked frames
    r = ranks + (ranks >= j[:, :, None]).long()
    masked_first = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)      # masked frames, in time order
    neg = torch.gather(masked_first, 1, r.flatten(1)).view_as(ranks)
    own = torch.arange(t, device=mask.device)[None, :, None].expand_as(ranks)
    return torch.where(mask[:, :, None], neg, own)


def sample_negatives(mask: torch.Tensor, num_negatives: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """K distractors per masked frame, uniform over the *other masked frames of the same utterance*
    (with replacement; never the frame itself, never an unmasked or padding frame).

    Shape: mask (B, T) bool → (B, T, K) long frame indices.
    """
    return negatives_from_ranks(mask, draw_negative_ranks(mask, num_negatives, generator))


# --------------------------------------------------------------------------- quantiser

def perplexity(probs: torch.Tensor) -> torch.Tensor:
    """Σ_g exp(−Σ_v p̄_gv log p̄_gv) with p̄ the mean over rows. Shape: probs (N, G, V) → ()."""
    avg = probs.mean(0)
    return torch.exp(-torch.xlogy(avg, avg).sum(-1)).sum()


class GumbelQuantizer(nn.Module):
    """Product quantiser with a straight-through Gumbel softmax (Baevski et al. 2020, §2; Jang et al. 2016).

    logits l = W x (G groups × V entries); in training the code of group g is
    one_hot(argmax_v (l_gv + n_v) / τ) with Gumbel noise n = −log(E), E ~ Exp(1) (E clamped away from
    0: ``exponential_`` can draw 0 and log(0) would give NaN), its gradient that of the softmax
    (straight-through); in eval mode the argmax of l. The G chosen codevectors (each ``code_dim / G``)
    are concatenated.

    ``perplexity`` (what the diversity loss uses) is that of the softmax of l (no noise) averaged over
    the rows ``mask`` selects (transformers and fairseq: the masked frames); in eval mode it is that of
    the one-hot codes, as transformers computes it. ``code_perplexity`` is always that of the argmax codes.

    Shape: x (B, T, D) → codes (B, T, code_dim), perplexity (), code_perplexity ().
    """

    def __init__(self, in_dim: int, groups: int, entries: int, code_dim: int):
        super().__init__()
        if code_dim % groups:
            raise ValueError(f"code_dim {code_dim} must be a multiple of groups {groups}")
        self.groups, self.entries = groups, entries
        self.weight_proj = nn.Linear(in_dim, groups * entries)
        nn.init.normal_(self.weight_proj.weight, 0.0, 1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.codevectors = nn.Parameter(torch.rand(1, groups * entries, code_dim // groups))

    def forward(self, x: torch.Tensor, temperature: float,
                mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        b, t, _ = x.shape
        g, v = self.groups, self.entries
        with torch.autocast(x.device.type, enabled=False):
            logits = self.weight_proj(x.float()).view(b * t * g, v)                # (B·T·G, V)
            hard_idx = logits.argmax(-1)
            hard = torch.zeros_like(logits).scatter_(-1, hard_idx[:, None], 1.0)
            if self.training:
                e = torch.empty_like(logits).exponential_().clamp_min_(torch.finfo(logits.dtype).tiny)
                y_soft = ((logits - e.log()) / temperature).softmax(-1)
                y_hard = torch.zeros_like(logits).scatter_(-1, y_soft.argmax(-1, keepdim=True), 1.0)
                onehot = y_hard - y_soft.detach() + y_soft                           # straight-through
                dist = logits.view(b * t, g, v).softmax(-1)
            else:
                onehot = hard
                dist = hard.view(b * t, g, v)
            rows = slice(None) if mask is None else mask.reshape(-1)
            ppl = perplexity(dist[rows])
            code_ppl = perplexity(hard.view(b * t, g, v)[rows].detach())
            codes = torch.einsum("ngv,gvd->ngd", onehot.view(b * t, g, v), self.codevectors.view(g, v, -1))
        return {"codes": codes.reshape(b, t, -1), "perplexity": ppl, "code_perplexity": code_ppl}


# --------------------------------------------------------------------------- the objective

class Wav2Vec2(AudioObjective):
    """wav2vec 2.0 (Baevski, Zhou, Mohamed & Auli 2020, "wav2vec 2.0: A Framework for Self-Supervised
    Learning of Speech Representations").

    Backbone: an ``audio_transformer`` (conv frames ``local``, transformer ``context``). For a batch of
    utterances x (B, L):

    * z = local(x) (B, T, D), its gradient scaled by g = ``feature_grad_mult``
      (z ← g·z + (1 − g)·sg(z)); feature penalty P = mean(z²) (fairseq's ``features_pen``).
    * targets: q = W_q · PQ(LayerNorm(z)) (B, T, F), the product quantiser (:class:`GumbelQuantizer`)
      on the *unmasked* frames, G groups × V entries, Gumbel temperature
      τ = max(τ_max · γ^step, τ_min) (``self.step``, set by the loop).
    * span mask M (B, T) (:func:`span_mask`): int(p·T/ℓ + U[0,1)) span starts (p = ``mask_prob``
      = 0.65, the code's value; the paper's "p = 0.065" is the probability of starting a span),
      spans of ℓ = 10 frames, overlaps allowed, at least ``min_masks`` spans.
    * context: c = W_c · context(z with the masked frames replaced by a learned mask embedding) (B, T, F).
    * for each masked frame t, K distractors q̃ from other masked frames of the same utterance
      (:func:`sample_negatives`); with sim the cosine similarity and κ = 0.1,

          L_m = mean_{t∈M} −log [ exp(sim(c_t, q_t)/κ) / Σ_{q̃ ∈ {q_t} ∪ Q_t} exp(sim(c_t, q̃)/κ) ]

      a distractor equal to q_t gets logit −∞ (transformers, fairseq).
    * diversity L_d = (G·V − Σ_g exp(H(p̄_g)))/(G·V), p̄_g the softmax of the quantiser's logits (no
      Gumbel noise) averaged over the masked frames of the batch.
    * L = L_m + α·L_d + λ·P, α = 0.1; λ = ``feature_penalty``, default 0 here (see below).

    The reference (fairseq, transformers) sums L_m over the masked frames and multiplies α·L_d and λ·P
    by the number of masked frames, then divides the gradient by that number; here L_m is a mean and the
    extra terms are not multiplied: the same loss divided by the number of targets. Mixing the two
    (a mean L_m with a scaled L_d, or a summed L_m with an unscaled one) weighs the diversity term
    wrongly by that factor, and the codebook collapses (perplexity → ~G, accuracy → 1).

    The LayerNorm is on the quantiser's input only: the backbone's ``local`` already ends in a per-frame
    channel norm, and ``context`` must see what it sees at evaluation (``backbone(x)`` with no norm
    between ``local`` and ``context``). The mask embedding lives in ``local``'s space (fairseq's lives after
    the feature projection, which ``audio_transformer`` does not have: its ``local_dim`` equals its width).
    No dropouts (fairseq's ``dropout_input``/``dropout_features`` 0.1) and no augmentation (as in the paper;
    ``augment=True`` adds a light gain/noise/shift one).

    The feature penalty's weight: fairseq uses λ = 10 (``loss_weights: [0.1, 10]``) for its base model,
    whose conv encoder is un-normalised after the first layer, and λ = 0 (``loss_weights: [0.1, 0]``)
    for its ``extractor_mode: layer_norm`` encoder (the large LibriVox config). ``audio_transformer``'s conv
    frames are layer-normed at every layer and end in a GELU, like the latter: λ = 10 shrinks them through
    the norms' affine weights until the quantiser's input is nearly constant (measured: on tiny chirps
    the codebook collapsed, perplexity 2.03 of 32, accuracy 0.96 after 150 steps; with λ = 0 the
    perplexity rose to 26). So the default is 0; λ is a parameter (``feature_penalty: 10`` for the
    base recipe on an un-normalised encoder).

    CPU defaults that differ from the paper (base: G × V = 2 × 320, K = 100, F = 256): G × V = 2 × 64,
    K = 20, F = ``final_dim`` = 64, ``code_dim`` = 64, because a 1 s clip has T = 98 frames (~48
    masked; the paper's crops have up to 15.6 s) and a CPU run sees ~1000 steps, not 400 k; the
    temperature schedule is the paper's (2 → 0.5, γ = 0.999995 per step): pass a smaller
    ``temperature_decay`` (e.g. 0.997) to anneal within a short run.

    Shapes: make_views: utterances (B, 1, L) → {"wave": (B, L) float32, "mask": (B, T) bool,
    "negatives": (B, T, K) long (frame indices in the same utterance)}; forward → {"loss": (), ...}.
    Logged: ``contrastive_loss``, ``diversity_loss``, ``feature_penalty``, ``prob_perplexity`` (the
    soft one in L_d), ``code_perplexity`` (of the argmax codes; max G·V), ``accuracy`` (share of masked
    frames whose positive scores highest), ``temperature``.
    """

    name = "wav2vec2"
    contrastive = True

    def __init__(self, backbone: nn.Module, image_size: int = 28, in_channels: Optional[int] = None,
                 mask_prob: float = 0.65, mask_length: int = 10, min_masks: int = 2, num_negatives: int = 20,
                 groups: int = 2, entries: int = 64, code_dim: int = 64, final_dim: int = 64,
                 logit_temperature: float = 0.1, max_temperature: float = 2.0, min_temperature: float = 0.5,
                 temperature_decay: float = 0.999995, diversity_weight: float = 0.1, feature_penalty: float = 0.0,
                 feature_grad_mult: float = 0.1, augment: bool = False):
        super().__init__(backbone, image_size, in_channels)
        if getattr(backbone, "context_kind", None) != "transformer" or not hasattr(backbone, "frames"):
            raise ValueError(f"wav2vec2 needs a backbone with a transformer context (audio_transformer); "
                             f"{getattr(backbone, 'name', type(backbone).__name__)} has context "
                             f"{getattr(backbone, 'context_kind', None)!r}")
        if not 0 < mask_prob <= 1 or mask_length < 1 or min_masks < 0:
            raise ValueError(f"wav2vec2: mask_prob in (0, 1], mask_length >= 1, min_masks >= 0; got {mask_prob}, "
                             f"{mask_length}, {min_masks}")
        if num_negatives < 1 or groups < 1 or entries < 2 or code_dim < groups or code_dim % groups or final_dim < 1:
            raise ValueError(f"wav2vec2: num_negatives >= 1, groups >= 1, entries >= 2, code_dim a positive multiple "
                             f"of groups, final_dim >= 1; got {num_negatives}, {groups}, {entries}, {code_dim}, "
                             f"{final_dim}")
        if logit_temperature <= 0 or not 0 < min_temperature <= max_temperature or not 0 < temperature_decay <= 1:
            raise ValueError(f"wav2vec2: logit_temperature > 0, 0 < min_temperature <= max_temperature, "
                             f"temperature_decay in (0, 1]; got {logit_temperature}, {min_temperature}, "
                             f"{max_temperature}, {temperature_decay}")
        if diversity_weight < 0 or feature_penalty < 0 or feature_grad_mult < 0:
            raise ValueError(f"wav2vec2: diversity_weight, feature_penalty, feature_grad_mult >= 0; got "
                             f"{diversity_weight}, {feature_penalty}, {feature_grad_mult}")
        self.mask_prob, self.mask_length, self.min_masks = float(mask_prob), int(mask_length), int(min_masks)
        self.num_negatives, self.kappa = int(num_negatives), float(logit_temperature)
        self.temps = (float(max_temperature), float(min_temperature), float(temperature_decay))
        self.alpha, self.lam, self.grad_mult = float(diversity_weight), float(feature_penalty), float(feature_grad_mult)
        self.augment = AudioAugment(gain_db=6.0, noise_p=0.3, snr_db=(15.0, 30.0), shift=0.05, speed_p=0.0) \
            if augment else None
        d_local, d_ctx = backbone.local_dim, backbone.feature_dim
        self.feature_norm = nn.LayerNorm(d_local)
        self.quantizer = GumbelQuantizer(d_local, int(groups), int(entries), int(code_dim))
        self.project_q = nn.Linear(int(code_dim), int(final_dim))
        self.final_proj = nn.Linear(d_ctx, int(final_dim))
        self.mask_emb = nn.Parameter(torch.rand(d_local))

    def temperature(self) -> float:
        """τ = max(τ_max · γ^step, τ_min)."""
        t_max, t_min, decay = self.temps
        return max(t_max * decay ** int(self.step), t_min)

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The utterances (augmented only with ``augment=True``), the span mask and the distractors.

        Shape: images (B, 1, L) or (B, L) float → {"wave": (B, L) float32, "mask": (B, T) bool,
        "negatives": (B, T, K) long}, T = backbone.frames(L), on the images' device.
        """
        wave = augment_waveforms(images, self.augment, generator) if self.augment is not None else waveforms(images)
        b, t = wave.shape[0], self.backbone.frames(wave.shape[1])
        if t < self.mask_length:
            raise ValueError(f"wav2vec2: utterances of {wave.shape[1]} samples give {t} frames, fewer than "
                             f"mask_length={self.mask_length}")
        mask = span_mask(b, t, self.mask_prob, self.mask_length, self.min_masks, generator=generator,
                         device=wave.device)
        return {"wave": wave, "mask": mask, "negatives": sample_negatives(mask, self.num_negatives, generator)}

    def features(self, wave: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """Frames, quantised targets and context (the Gumbel noise is the first random draw, before the
        context). Shape: wave (B, L), mask (B, T) → z, quantizer_input (B, T, D_local), context
        (B, T, feature_dim), codes (B, T, code_dim); perplexities, feature_penalty (); temperature float."""
        z = self.backbone.local(wave)                                            # (B, T, D)
        if z.shape[1] != mask.shape[1]:
            raise ValueError(f"wav2vec2: the mask has {mask.shape[1]} frames, the backbone gave {z.shape[1]}")
        if self.grad_mult != 1.0:
            z = z * self.grad_mult + z.detach() * (1.0 - self.grad_mult)
        penalty = z.float().pow(2).mean()
        tau = self.temperature()
        qin = self.feature_norm(z)
        q = self.quantizer(qin, tau, mask)
        masked = torch.where(mask[..., None], self.mask_emb.to(z.dtype), z)
        c = self.backbone.context(masked)                                        # (B, T, feature_dim)
        return {"z": z, "quantizer_input": qin, "context": c, "codes": q["codes"], "perplexity": q["perplexity"],
                "code_perplexity": q["code_perplexity"], "feature_penalty": penalty, "temperature": tau}

    def contrastive_logits(self, context: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor,
                           negatives: torch.Tensor) -> torch.Tensor:
        """sim(c_t, ·)/κ against [q_t, q̃_1..K] for the masked frames (row-major order), −∞ where a
        distractor equals q_t. Shape: context (B, T, feature_dim), codes (B, T, code_dim), mask (B, T),
        negatives (B, T, K) → (N, 1 + K) float32, N = mask.sum()."""
        with torch.autocast(context.device.type, enabled=False):
            b_idx, t_idx = mask.nonzero(as_tuple=True)                           # (N,)
            c = self.final_proj(context[b_idx, t_idx].float())                   # (N, F)
            q = self.project_q(codes.float())                                    # (B, T, F)
            pos = q[b_idx, t_idx]                                                # (N, F)
            neg = q[b_idx[:, None], negatives[b_idx, t_idx]]                     # (N, K, F)
            logits = F.cosine_similarity(c[:, None], torch.cat([pos[:, None], neg], 1), dim=-1) / self.kappa
            same = torch.cat([torch.zeros_like(pos[:, :1], dtype=torch.bool), (neg == pos[:, None]).all(-1)], 1)
            return logits.masked_fill(same, float("-inf"))

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: wave (B, L), mask (B, T) bool, negatives (B, T, K) → {"loss": (), contrastive_loss,
        diversity_loss, feature_penalty, prob_perplexity, code_perplexity, accuracy: (), temperature: float}."""
        mask, negatives = views["mask"], views["negatives"]
        f = self.features(views["wave"], mask)
        logits = self.contrastive_logits(f["context"], f["codes"], mask, negatives)
        with torch.autocast(logits.device.type, enabled=False):
            contrastive = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
            n_codes = self.quantizer.groups * self.quantizer.entries
            diversity = (n_codes - f["perplexity"]) / n_codes
            loss = contrastive + self.alpha * diversity + self.lam * f["feature_penalty"]
            with torch.no_grad():
                best, worst = logits.argmax(-1) == 0, logits.argmin(-1) == 0     # fairseq: all-equal rows don't count
                accuracy = (best & ~worst).float().mean()
        return {"loss": loss, "contrastive_loss": contrastive.detach(), "diversity_loss": diversity.detach(),
                "feature_penalty": f["feature_penalty"].detach(), "prob_perplexity": f["perplexity"].detach(),
                "code_perplexity": f["code_perplexity"], "accuracy": accuracy, "temperature": f["temperature"]}

    def extra_repr(self) -> str:
        g, v = self.quantizer.groups, self.quantizer.entries
        return (f"{super().extra_repr()}, mask_prob={self.mask_prob}, mask_length={self.mask_length}, "
                f"negatives={self.num_negatives}, codebook={g}x{v}")


__all__ = ["Wav2Vec2", "GumbelQuantizer", "span_mask", "draw_span_starts", "spans_to_mask", "num_mask_spans",
           "sample_negatives", "draw_negative_ranks", "negatives_from_ranks", "perplexity"]
