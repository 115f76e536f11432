"""A synthetic but physiological-looking 8-lead ECG for the software box.

A moving cardiac dipole: each wave (P, Q, R, S, T) is a Gaussian in time pointing in its
own direction in the body; every lead is the dipole projected on that lead's axis. So
Einthoven's law (III = II − I) holds as in a real body, the limb leads have their usual
shapes and R grows from V1 to V5.
"""

from __future__ import annotations

import math

import numpy as np

# (offset from R in s, width in s, amplitude in mV, direction x=left, y=down, z=front)
_WAVES = (
    (-0.20, 0.025, 0.15, (0.5, 0.8, 0.2)),  # P
    (-0.035, 0.010, 0.25, (-0.4, 0.1, 0.8)),  # q: septum, right and forward
    (0.0, 0.011, 1.40, (0.7, 0.6, -0.35)),  # R: left, down, back
    (0.035, 0.011, 0.45, (-0.4, -0.3, -0.7)),  # S
    (0.26, 0.050, 0.35, (0.6, 0.6, 0.3)),  # T (shifted with rate below)
)


def _unit(x: float, y: float, z: float) -> np.ndarray:
    v = np.array([x, y, z])
    return v / np.linalg.norm(v)


def _precordial(angle_deg: float) -> np.ndarray:
    """A chest lead's axis in the horizontal plane, from left (0°) towards the front."""
    a = math.radians(angle_deg)
    return np.array([math.cos(a), 0.1, math.sin(a)])


# Lead axes, in the box's lead order I, II, V1..V6.
LEAD_AXES = np.array([
    [1.0, 0.0, 0.0],  # I: 0°
    [math.cos(math.radians(60)), math.sin(math.radians(60)), 0.0],  # II: +60°
    _precordial(115), _precordial(95), _precordial(75), _precordial(55), _precordial(25), _precordial(0),
])


class EcgSynth:
    """Samples of the eight acquired leads, continuing in time from call to call."""

    def __init__(self, heart_rate: float = 72.0, sample_rate: int = 500, nv_per_lsb: int = 2500,
                 noise: bool = False, lead_off: tuple[int, ...] = (), seed: int = 1) -> None:
        self.rr = 60.0 / heart_rate
        self.rate = sample_rate
        self.lsb_mv = nv_per_lsb / 1e6
        self.noise = noise
        self.lead_off = lead_off  # indices into the box's leads that read flat
        self.rng = np.random.default_rng(seed)
        self.t = 0  # samples emitted so far
        self._beats: list[float] = [0.35]

    def _beat_times(self, until: float) -> list[float]:
        while self._beats[-1] < until + 1.0:
            self._beats.append(self._beats[-1] + self.rr * (1 + 0.03 * self.rng.standard_normal()))
        self._beats = [b for b in self._beats if b > until - 3.0] or self._beats[-1:]
        return self._beats

    def block(self, n: int) -> np.ndarray:
        """The next ``n`` samples as (n, 8) int16 LSB."""
        t = (self.t + np.arange(n)) / self.rate
        self.t += n
        dipole = np.zeros((n, 3))
        qt_shift = 0.26 * math.sqrt(self.rr) - 0.26
        for r in self._beat_times(float(t[-1])):
            for offset, width, amp, direction in _WAVES:
                center = r + offset + (qt_shift if offset > 0.2 else 0.0)
                g = amp * np.exp(-0.5 * ((t - center) / width) ** 2)
                dipole += np.outer(g, _unit(*direction))
        mv = dipole @ LEAD_AXES.T
        mv += 0.05 * np.sin(2 * np.pi * 0.25 * t)[:, None]  # breathing: baseline wander
        if self.noise:
            mv += 0.1 * np.sin(2 * np.pi * 50 * t)[:, None]  # mains hum
            mv += 0.03 * self.rng.standard_normal(mv.shape)  # muscle
        for lead in self.lead_off:
            mv[:, lead] = 0.005 * self.rng.standard_normal(n)
        return np.clip(np.rint(mv / self.lsb_mv), -32767, 32767).astype(np.int16)
