"""Labs: named, seeded variations of the SO-101 pick-and-place scene, one per simulated robot owner.

They differ the way different owners' setups do: the cube (colour, size), where cubes and targets
lie on the table, the camera's mounting, the lighting and the table. Four client labs and one held-out
"unseen" lab that no client trains on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

import numpy as np

COLOURS = {
    "red": (0.85, 0.12, 0.10),
    "blue": (0.12, 0.30, 0.90),
    "yellow": (0.95, 0.80, 0.10),
    "orange": (0.95, 0.45, 0.05),
    "purple": (0.55, 0.15, 0.75),
    "green": (0.10, 0.75, 0.25),
    "white": (0.92, 0.92, 0.92),
    "cyan": (0.10, 0.80, 0.85),
    "black": (0.08, 0.08, 0.08),
}


@dataclass(frozen=True)
class LabSpec:
    name: str
    cube_colour: str = "red"
    target_colour: str = "green"
    cube_half_size: float = 0.02  # metres; the expert's grasp height suits 0.017-0.022
    cube_region: tuple[tuple[float, float], tuple[float, float]] = ((0.15, -0.10), (0.30, 0.10))  # (x, y) min, max
    target_region: tuple[tuple[float, float], tuple[float, float]] = ((0.15, -0.10), (0.30, 0.10))
    camera_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)  # front camera position shift, metres
    camera_tilt_deg: float = 0.0  # extra pitch of the front camera
    light: float = 1.0  # scales every light
    table_rgb: tuple[tuple[float, float, float], tuple[float, float, float]] = ((0.1, 0.2, 0.3), (0.2, 0.3, 0.4))
    seed: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def task(self) -> str:
        return f"pick up the {self.cube_colour} cube and place it on the {self.target_colour} target"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


LABS: dict[str, LabSpec] = {
    lab.name: lab
    for lab in (
        LabSpec("lab-red", "red", "green", 0.020, seed=101),
        LabSpec(
            "lab-blue",
            "blue",
            "yellow",
            0.018,
            cube_region=((0.15, -0.10), (0.24, 0.10)),
            target_region=((0.20, -0.10), (0.30, 0.10)),
            camera_offset=(0.0, 0.06, 0.02),
            camera_tilt_deg=3.0,
            light=1.2,
            table_rgb=((0.45, 0.32, 0.20), (0.52, 0.38, 0.25)),
            seed=202,
        ),
        LabSpec(
            "lab-orange",
            "orange",
            "blue",
            0.021,
            cube_region=((0.18, -0.10), (0.30, 0.02)),
            target_region=((0.15, -0.02), (0.30, 0.10)),
            camera_offset=(-0.05, -0.05, 0.03),
            camera_tilt_deg=-3.0,
            light=0.8,
            table_rgb=((0.55, 0.55, 0.55), (0.62, 0.62, 0.62)),
            seed=303,
        ),
        LabSpec(
            "lab-yellow",
            "yellow",
            "purple",
            0.019,
            cube_region=((0.15, -0.02), (0.30, 0.10)),
            target_region=((0.15, -0.10), (0.30, 0.02)),
            camera_offset=(0.04, -0.03, -0.02),
            camera_tilt_deg=2.0,
            light=1.0,
            table_rgb=((0.15, 0.30, 0.15), (0.20, 0.36, 0.20)),
            seed=404,
        ),
        LabSpec(
            "lab-unseen",
            "purple",
            "white",
            0.020,
            camera_offset=(0.03, 0.04, 0.0),
            camera_tilt_deg=-2.0,
            light=0.9,
            table_rgb=((0.25, 0.20, 0.30), (0.30, 0.25, 0.36)),
            seed=505,
            tags=("unseen",),
        ),
    )
}
CLIENT_LABS = ("lab-red", "lab-blue", "lab-orange", "lab-yellow")
UNSEEN_LAB = "lab-unseen"


def get_lab(name: str) -> LabSpec:
    """A client lab, lab-unseen, or a community lab by its name (`community-<seed>-<index>`, e.g.
    community-0-007: the 8th of `community_labs(n, 0)` for any n > 7)."""
    if name in LABS:
        return LABS[name]
    community = re.fullmatch(r"community-(\d+)-(\d{3,})", name)
    if community:
        seed, index = int(community[1]), int(community[2])
        return community_labs(index + 1, seed)[index]
    raise KeyError(f"unknown lab {name!r}: choose one of {', '.join(LABS)} or community-<seed>-<index>")


# ----------------------------------------------------------------------------- community labs

WORKSPACE = ((0.15, -0.10), (0.30, 0.10))  # where the expert can pick and place: (x, y) min, max


def _region(rng: np.random.Generator) -> tuple[tuple[float, float], tuple[float, float]]:
    """Half the labs use the whole workspace, the others a random part of it (>= 60% of each side)."""
    (x0, y0), (x1, y1) = WORKSPACE
    if rng.random() < 0.5:
        return WORKSPACE
    w, h = rng.uniform(0.6, 1.0) * (x1 - x0), rng.uniform(0.6, 1.0) * (y1 - y0)
    ax, ay = rng.uniform(x0, x1 - w), rng.uniform(y0, y1 - h)
    return ((round(ax, 3), round(ay, 3)), (round(ax + w, 3), round(ay + h, 3)))


def community_labs(n: int, seed: int = 0) -> list[LabSpec]:
    """`n` labs of other robot owners, the data a base policy is pretrained on (as smolvla_base was on
    community datasets): random cube colour and size, cube and target regions, front-camera mounting,
    lighting and table, drawn from `seed`. None has the cube/target colours of a client lab or of the
    unseen lab, so no community task string is one a client trains or is judged on."""
    taken = {(lab.cube_colour, lab.target_colour) for lab in LABS.values()}
    pairs = [(c, t) for c in COLOURS for t in COLOURS if c != t and (c, t) not in taken]
    rng = np.random.default_rng([seed, 7001])
    labs = []
    for i in range(n):
        cube, target = pairs[int(rng.integers(len(pairs)))]
        table = rng.uniform(0.05, 0.6, size=3)
        labs.append(
            LabSpec(
                f"community-{seed}-{i:03d}",
                cube,
                target,
                round(float(rng.uniform(0.017, 0.022)), 4),
                cube_region=_region(rng),
                target_region=_region(rng),
                camera_offset=tuple(round(float(v), 3) for v in rng.uniform([-0.06, -0.06, -0.03], [0.06, 0.06, 0.03])),
                camera_tilt_deg=round(float(rng.uniform(-4, 4)), 2),
                light=round(float(rng.uniform(0.75, 1.25)), 3),
                table_rgb=(tuple(round(float(v), 3) for v in table), tuple(round(float(v), 3) for v in table + 0.07)),
                seed=10_000 + 100 * seed + i,
                tags=("community",),
            )
        )
    return labs
