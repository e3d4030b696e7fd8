"""Audio-visual correspondence: does this sound go with this frame? ("Look, Listen and Learn",
"Objects that Sound"), with AVOL-Net's localisation: the score is the best-matching place in the frame."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.audio import AudioAugment, augment_waveforms, waveforms
from ssl_models.audio_encoder import audio_conv
from ssl_models.augment import normalize_input, prepare_images
from ssl_models.objectives.base import Objective
from ssl_models.rng import rand, randint


class AVCorrespondence(Objective):
    """Audio-visual correspondence with localisation (Arandjelović & Zisserman 2017, "Look, Listen and
    Learn", ICCV; 2018, "Objects that Sound", ECCV: AVOL-Net).

    Two sub-networks learn from unlabelled video: a vision network ``f`` (``self.backbone``, what is
    exported and evaluated) on one frame of a clip, and an audio network ``g`` (``self.audio_net``) on
    the clip's sound track. The pretext task is binary: do this frame and this sound come from the same
    clip? Positives are (frame b, sound b); negatives (frame b, sound of another clip n(b)).

    Localisation (AVOL-Net): the vision side keeps its spatial map, so the audio embedding is compared
    with every position (i, j) of the frame's map, and the clip-level score is the best position —
    multiple-instance learning: the sound must match *somewhere* in the frame, which pulls the match
    onto the object that makes the sound:

        V = normalise_E(P_v(f_stage(x)))              (B, E, h, w)   P_v: a 1×1 conv
        a = normalise(P_a(max_t g.encode(s)_t))       (B, E)         P_a: a linear layer
        S_ij = ⟨a, V_ij⟩ ∈ [−1, 1]                    (B, h, w)      the similarity (localisation) map
        p = max_ij σ(w · S_ij + β)                    (B,)           calibration: a 1×1 conv, one weight w and bias β
        L = −(1/2B) Σ_b [log p(x_b, s_b) + log(1 − p(x_b, s_n(b)))]      binary cross-entropy, fp32

    (σ is monotone, so p = σ(max_ij (w S_ij + β)) for w > 0; the loss is taken on that logit, and the
    map is calibrated before the max, as in the paper, so a negative w pools what it should.)

    The audio vector max-pools the encoder's frames over time, as the paper's audio network max-pools
    its last conv map over time and frequency (L³-Net's pool4): a sound that lasts part of the clip
    (an onset, a bounce) counts as fully as a steady one, where a mean would dilute it by its duration.

    Where ours differs from the papers, and why:
      * the widths are tiny (a ResNet-18 of width 32 and a 64-d audio encoder, not VGG-style nets of
        512 channels; embeddings of 64, not 128) for CPU runs;
      * the projections are one layer each (the paper: two 128-d layers, conv7/conv8 as 1×1 convs,
        fc1/fc2 on the audio side): with two layers and a ReLU between, the small nets of the learning
        test sat at chance (loss log 2) for ~100 steps against ~60 in our one comparison;
      * the calibration starts as the identity (w = 1, β = 0; see ``__init__``);
      * the audio network is gelato's strided conv encoder on the raw waveform
        (``ssl_models.audio_encoder.audio_conv``, one frame per 10 ms), not a VGG on a 257×200
        log-spectrogram of 1 s of sound;
      * frames are 32–64 px (the 64 px Moving Fashion-MNIST frames, resized), not 224 px: the map is
        h = S/8 (6×6 at 48 px with the small stem), not 14×14;
      * negatives: one per clip, the sound of another clip of the same batch through a random
        derangement (a random single cycle: each clip's negative is uniform over the others, and
        every sound is used once as a positive and once as a negative, so the classes are balanced).
        The paper draws negatives from other videos at random too; a negative that happens to sound
        alike is accepted as label noise;
      * augmentation: a light crop of the frame (no flip, colour jitter is not used), gain and noise on
        the sound (no shift or speed change: they would move the sound against the frame, and a speed
        change moves pitch, which is what tells sounds apart).

    Args:
        backbone: the vision backbone: an image backbone with ``feature_maps(x)`` → list of (B, C_s, h, w).
        image_size: side S of the square frames it sees.
        embed_dim: E, the shared embedding size.
        audio_dim: width of the audio encoder (``audio_conv(dim=audio_dim)``).
        stage: which of ``backbone.feature_maps`` is the localisation map (−1: the last, layer4). An
            earlier one (−2: layer3, twice as fine) localises better but leaves the later stages, which
            the exported backbone's pooled feature comes from, untrained (they take part with zero
            gradients, for DistributedDataParallel).
        crop_scale: area range of the frame's random crop.
        gain_db, noise_p: the sound's augmentation (``ssl_models.audio.AudioAugment``).

    Shapes: images = {"clip": uint8 (B, T, C, H, W), "audio": float (B, 1, L)} → views {"frames":
    (B, C, S, S) normalised, "audio": (B, L), "negative": (B,) long}; the vision backbone sees B frames,
    the audio network B sounds; 2B pairs are scored. Logged: ``accuracy`` (threshold 0.5 on the 2B
    pairs), ``pos_score``, ``neg_score`` (mean p on positives and on negatives), ``scale``, ``bias``.
    """

    name = "av_correspondence"
    contrastive = True
    modality = "audiovisual"   # make_views takes {"clip": (B, T, C, H, W) uint8, "audio": (B, 1, L) float}

    def __init__(self, backbone: nn.Module, image_size: int, in_channels: int | None = None, embed_dim: int = 64,
                 audio_dim: int = 64, stage: int = -1, crop_scale: tuple[float, float] = (0.8, 1.0),
                 gain_db: float = 6.0, noise_p: float = 0.5):
        super().__init__(backbone, image_size, in_channels)
        what = getattr(backbone, "name", type(backbone).__name__)
        if not hasattr(backbone, "feature_maps") or (hasattr(backbone, "local") and hasattr(backbone, "context")):
            raise ValueError(f"av_correspondence needs an image backbone with spatial feature_maps() (B, C, h, w) "
                             f"as its vision network (it builds its own audio network); got {what}")
        if embed_dim < 1 or audio_dim < 8:
            raise ValueError(f"av_correspondence: embed_dim >= 1 and audio_dim >= 8, got {embed_dim}, {audio_dim}")
        crop_scale = tuple(float(c) for c in crop_scale)
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"av_correspondence: crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        if gain_db < 0 or not 0 <= noise_p <= 1:
            raise ValueError(f"av_correspondence: gain_db >= 0 and noise_p in [0, 1], got {gain_db}, {noise_p}")
        channels, n_maps = self._probe(int(stage))
        self.stage = int(stage) % n_maps
        self.embed_dim, self.audio_dim = int(embed_dim), int(audio_dim)
        self.crop_scale = crop_scale
        self.audio_augment = AudioAugment(gain_db=float(gain_db), noise_p=float(noise_p), shift=0.0,
                                          speed=(1.0, 1.0), speed_p=0.0)
        self.audio_net = audio_conv(dim=audio_dim)
        self.vision_proj = nn.Conv2d(channels, embed_dim, 1)
        self.audio_proj = nn.Linear(self.audio_net.feature_dim, embed_dim)
        # the paper's calibration: a 1×1 conv with one weight and one bias on the similarity map. It starts
        # as the identity (w = 1, β = 0), not conv's random init, whose weight may be negative. A sharper
        # start (w = 5 or 10) made the first steps push every similarity down at once (all pairs look alike
        # before training, the max over positions scores them ~0.9), and training stalled at log 2 for
        # 120+ steps on 2 of 8 seeds of the learning test (3 of 8 with w = 10); w = 1 on none of 17.
        self.calibration = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.calibration.weight.fill_(1.0)
            self.calibration.bias.zero_()

    @torch.no_grad()
    def _probe(self, stage: int) -> tuple[int, int]:
        """Channels of feature map ``stage`` and the number of maps, from one dummy frame in eval mode
        (no batch-norm statistic moves). Returns (C_stage, number of maps)."""
        param = next(self.backbone.parameters())
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            x = torch.zeros(1, self.in_channels, self.image_size, self.image_size, device=param.device,
                            dtype=param.dtype)
            maps = self.backbone.feature_maps(x)
        finally:
            self.backbone.train(was_training)
        if not -len(maps) <= stage < len(maps):
            raise ValueError(f"av_correspondence: stage {stage} out of range for {len(maps)} feature maps")
        if maps[stage].ndim != 4:
            raise ValueError(f"av_correspondence needs spatial feature_maps (B, C, h, w); "
                             f"{getattr(self.backbone, 'name', type(self.backbone).__name__)}'s map {stage} has "
                             f"shape {tuple(maps[stage].shape)}")
        return int(maps[stage].shape[1]), len(maps)

    # ------------------------------------------------------------------ views
    @staticmethod
    def derangement(b: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """A random permutation with no fixed point: a random single cycle through the batch (a random
        order o, each o[k] sent to o[k+1]); each index's image is uniform over the other b − 1.

        Shape: → (b,) long, ``out[i] != i``.
        """
        if b < 2:
            raise ValueError(f"av_correspondence needs at least 2 clips per batch for its negatives, got {b}")
        order = rand(b, generator).argsort()
        out = torch.empty(b, dtype=torch.long)
        out[order] = order.roll(-1)
        return out.to(device if device is not None else "cpu")

    def make_views(self, images: dict[str, torch.Tensor],
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One random frame per clip (lightly cropped), the clip's sound (gain and noise), and each clip's
        negative: the index of another clip whose sound is paired with its frame as a negative.

        Shape: images {"clip": uint8 (B, T, C, H, W), "audio": float (B, 1, L) or (B, L)} →
        {"frames": (B, C, S, S) float32 normalised, "audio": (B, L) float32, "negative": (B,) long},
        on the clip's device.
        """
        if not isinstance(images, dict) or "clip" not in images or "audio" not in images:
            raise ValueError("av_correspondence takes {'clip': (B, T, C, H, W) uint8, 'audio': (B, 1, L)}")
        clips, sound = images["clip"], images["audio"]
        if clips.ndim != 5:
            raise ValueError(f"clips must be (B, T, C, H, W), got shape {tuple(clips.shape)}")
        b, t = clips.shape[:2]
        if sound.shape[0] != b:
            raise ValueError(f"{b} clips but {sound.shape[0]} sound tracks")
        dev = clips.device
        which = randint(0, t, (b,), generator, dev)                                   # one frame per clip
        frames = clips[torch.arange(b, device=dev), which]                            # (B, C, H, W)
        frames = normalize_input(prepare_images(frames, self.image_size, self.crop_scale, 0.0, generator))
        audio = augment_waveforms(waveforms(sound).to(dev), self.audio_augment, generator)
        negative = self.derangement(b, generator, dev)
        return {"frames": frames, "audio": audio, "negative": negative}

    # ------------------------------------------------------------------ embeddings
    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """The sound's embedding: the audio network's frames, max over time, the projection, L2-normalised.

        Shape: audio (B, 1, L) or (B, L) float → (B, E) float32, unit norm.
        """
        h = self.audio_net.encode(waveforms(audio)).amax(dim=1)                      # (B, D_audio)
        return F.normalize(self.audio_proj(h).float(), dim=1)

    def embed_map(self, frames: torch.Tensor) -> torch.Tensor:
        """The frame's embedding at every position of feature map ``stage``, L2-normalised along E.

        Shape: frames (B, C, S, S) normalised float → (B, E, h, w) float32.
        """
        return F.normalize(self.vision_proj(self.backbone.feature_maps(frames)[self.stage]).float(), dim=1)

    def _embed_map_and_zero(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`embed_map` and a zero that depends on the other feature maps (added to the loss so the
        stages after ``stage`` take part with zero gradients, as DistributedDataParallel without
        ``find_unused_parameters`` requires). Shape: → (B, E, h, w), scalar."""
        maps = self.backbone.feature_maps(frames)
        zero = sum((m.float().mean() for i, m in enumerate(maps) if i != self.stage),
                   torch.zeros((), device=frames.device)) * 0.0
        return F.normalize(self.vision_proj(maps[self.stage]).float(), dim=1), zero

    @staticmethod
    def _cosine_map(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Shape: v (B, E, h, w), a (B, E) → (B, h, w), in fp32."""
        with torch.autocast(v.device.type, enabled=False):
            return torch.einsum("behw,be->bhw", v.float(), a.float())

    def similarity_map(self, frames: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """Cosine between each clip's sound embedding and each position of its own frame's map (the
        localisation map, before calibration).

        Shape: frames (B, C, S, S) normalised float, audio (B, 1, L) or (B, L) → (B, h, w) float32.
        """
        return self._cosine_map(self.embed_map(frames), self.embed_audio(audio))

    def calibrated_logit(self, similarity: torch.Tensor) -> torch.Tensor:
        """The correspondence logit: the calibrated similarity map (w · S + β), max over positions.

        Shape: similarity (B, h, w) → (B,) float32; σ of it is the correspondence probability.
        """
        with torch.autocast(similarity.device.type, enabled=False):
            w, bias = self.calibration.weight.float().reshape(()), self.calibration.bias.float().reshape(())
            return (w * similarity.float() + bias).flatten(1).amax(dim=1)

    def correspondence(self, frames: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """Probability that each frame and the sound at the same index come from the same clip.

        Shape: frames (B, C, S, S), audio (B, 1, L) or (B, L) → (B,) float32 in (0, 1).
        """
        return torch.sigmoid(self.calibrated_logit(self.similarity_map(frames, audio)))

    # ------------------------------------------------------------------ loss
    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """BCE on the B positive pairs (frame b, sound b) and the B negatives (frame b, sound negative[b]).

        Shape: frames (B, C, S, S), audio (B, L), negative (B,) long → {"loss": scalar, "accuracy",
        "pos_score", "neg_score", "scale", "bias"}.
        """
        frames, audio, negative = views["frames"], views["audio"], views["negative"].long()
        v, zero = self._embed_map_and_zero(frames)                                   # (B, E, h, w)
        a = self.embed_audio(audio)                                                   # (B, E)
        with torch.autocast(frames.device.type, enabled=False):
            pos = self.calibrated_logit(self._cosine_map(v, a))                       # (B,)
            neg = self.calibrated_logit(self._cosine_map(v, a[negative]))             # (B,)
            logits = torch.cat([pos, neg])
            labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
            loss = F.binary_cross_entropy_with_logits(logits, labels) + zero
        with torch.no_grad():
            p_pos, p_neg = torch.sigmoid(pos), torch.sigmoid(neg)
            accuracy = torch.cat([p_pos > 0.5, p_neg <= 0.5]).float().mean()
        return {"loss": loss, "accuracy": accuracy, "pos_score": p_pos.mean(), "neg_score": p_neg.mean(),
                "scale": self.calibration.weight.detach().reshape(()),
                "bias": self.calibration.bias.detach().reshape(())}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, embed_dim={self.embed_dim}, audio_dim={self.audio_dim}, "
                f"stage={self.stage}, crop_scale={self.crop_scale}")
