"""``spoken-digits``: synthetic speech generated with espeak-ng, the embedded audio data set.

No download: the Debian package ``espeak-ng`` (installed by ``make demo``/CI, as Fashion-MNIST is)
speaks the ten digits and a few short command words, in ``voices`` voices (an English accent ×
an espeak voice variant, each with its own speaking rate and pitch), ``repeats`` times each with
the rate (±15 %) and pitch jittered, a random pause before and after (up to 0.25 s), then a seeded
gain and noise of a random colour (white to brown) at an SNR of 0–20 dB. Each utterance is written as a real FLAC file at espeak-ng's own rate
(22050 Hz) with a ``.json`` sidecar naming its voice, so the ingest goes through the real-audio
path (decode, resample to 16 kHz, check, store). Layout: ``train|test/<word>/<voice>-<rep>.flac``;
the test split holds ``test_repeats`` of the repeats of every (word, voice), so a probe of the voice
sees every voice in both splits. It is synthetic speech: clean, a few voices, easy words.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = DIGITS + ("yes", "no", "up", "down", "left", "right", "stop", "go")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd")
VARIANTS = ("m1", "f2", "m3", "f4", "m6", "f1", "m7", "f5")
RATE = 22050   # espeak-ng's output rate
SNR_DB = (0.0, 20.0)  # the added noise, relative to the utterance
MAX_SECONDS = 1.4     # with its pauses, under the 1.5 s at which an ingest at 1 s cuts a file in two
DEFAULTS = {"voices": 16, "repeats": 10, "test_repeats": 2, "words": WORDS, "seed": 0}


class SpeechSynthesisError(RuntimeError):
    """espeak-ng is missing or failed; the message says what to install."""


def voices(n: int) -> list[str]:
    """The first ``n`` voices: every accent with the first variant, then with the second, ..."""
    combos = [f"{a}+{v}" for v in VARIANTS for a in ACCENTS]
    if not 1 <= n <= len(combos):
        raise ValueError(f"voices must be in 1..{len(combos)}, got {n}")
    return combos[:n]


def espeak(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """One utterance from espeak-ng as float32 at 22050 Hz."""
    import soundfile as sf

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechSynthesisError("espeak-ng is not installed: as root on Debian/Ubuntu, apt-get install espeak-ng "
                                   "(make demo and make test do it when they can)")
    out = subprocess.run([exe, "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                         capture_output=True, timeout=60)
    if out.returncode != 0 or not out.stdout:
        raise SpeechSynthesisError(f"espeak-ng -v {voice} failed: {out.stderr.decode(errors='replace').strip()}")
    import io

    x, sr = sf.read(io.BytesIO(out.stdout), dtype="float32")
    if sr != RATE:
        raise SpeechSynthesisError(f"espeak-ng wrote {sr} Hz, expected {RATE}")
    return x


def _plan(voices_n: int, repeats: int, test_repeats: int, words, seed: int) -> list[dict]:
    rng = random.Random(seed)
    plan = []
    vs = voices(voices_n)
    style = {v: (rng.randint(130, 190), rng.randint(25, 75)) for v in vs}  # each voice's own rate and pitch
    for w in words:
        for vi, v in enumerate(vs):
            test = set(rng.sample(range(repeats), min(test_repeats, repeats)))
            for r in range(repeats):
                base_rate, base_pitch = style[v]
                plan.append({"word": w, "voice": v, "voice_id": vi, "repeat": r, "split": "test" if r in test else "train",
                             "rate": int(base_rate * rng.uniform(0.85, 1.15)),
                             "pitch": int(np.clip(base_pitch + rng.randint(-10, 10), 0, 99)),
                             "pad_s": [round(rng.uniform(0.0, 0.25), 3), round(rng.uniform(0.0, 0.25), 3)],
                             "gain_db": round(rng.uniform(-10.0, 0.0), 2), "snr_db": round(rng.uniform(*SNR_DB), 2),
                             "noise_colour": round(rng.uniform(0.0, 2.0), 2), "noise_seed": rng.randrange(2 ** 31)})
    return plan


def coloured_noise(n: int, colour: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise whose power falls as 1 / f^colour (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1 / RATE), 20.0)
    x = np.fft.irfft(spectrum / f ** (colour / 2), n)
    return (x / max(float(np.sqrt(np.mean(x ** 2))), 1e-12)).astype(np.float32)


def _render(root: str, item: dict) -> None:
    import soundfile as sf

    x = espeak(item["word"], item["voice"], item["rate"], item["pitch"])
    pads = [int(s * RATE) for s in item["pad_s"]]
    room = max(0, int(MAX_SECONDS * RATE) - len(x))     # one utterance stays one sample (no segment cut)
    if sum(pads) > room:
        pads = [p * room // sum(pads) for p in pads]
    pre, post = (np.zeros(p, np.float32) for p in pads)
    x = np.concatenate([pre, x, post]) * np.float32(10 ** (item["gain_db"] / 20))
    power = float(np.mean(np.square(x))) or 1e-10
    noise = coloured_noise(len(x), item["noise_colour"], np.random.default_rng(item["noise_seed"]))
    x = x + noise * np.float32(np.sqrt(power / 10 ** (item["snr_db"] / 10)))
    rel = f"{item['split']}/{item['word']}/{item['voice'].replace('+', '_')}-{item['repeat']:02d}"
    os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
    sf.write(os.path.join(root, rel + ".flac"), np.clip(x, -1, 1), RATE, format="FLAC", subtype="PCM_16")
    with open(os.path.join(root, rel + ".json"), "w") as f:
        json.dump({k: item[k] for k in ("word", "voice", "voice_id", "rate", "pitch", "gain_db", "snr_db", "noise_colour")},
                  f)


def generate(root: str, voices: int = 16, repeats: int = 10, test_repeats: int = 2, words=WORDS, seed: int = 0,
             threads: int = 4, progress: bool = True) -> str:
    """Write the data set under ``root`` (built in a temporary folder, renamed when complete)."""
    plan = _plan(voices, repeats, test_repeats, tuple(words), seed)
    espeak("zero", plan[0]["voice"], 150, 50)  # fails early, saying what to install
    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc="generate spoken-digits (espeak-ng)", unit="utt")
    try:
        with ThreadPoolExecutor(threads) as pool:  # espeak-ng runs as a subprocess: threads overlap them
            for _ in pool.map(lambda it: _render(tmp, it), plan):
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    with open(os.path.join(tmp, "spoken_digits.json"), "w") as f:
        json.dump({"voices": voices, "repeats": repeats, "test_repeats": test_repeats, "words": list(words),
                   "seed": seed, "rate": RATE, "count": len(plan), "synthetic": "espeak-ng"}, f, indent=1)
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
    os.replace(tmp, root)
    return root
