"""The attention-readout grounding probe on a tiny VLM with a wider, deeper vision tower and 4x the
image tokens (vision 128 wide, 4 layers, patch 8: 64 tokens per 128-pixel camera instead of 16), then
action training on decision frames only. The tiny VLM config is replaced for this process only (its own
Hugging Face cache), so nothing shipped changes.

    python probes/aim/wider_vision.py OUT_FOLDER GROUNDING_STEPS ACTION_STEPS
"""

import os
import sys
import tempfile

os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="zk0-wide-vlm-")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attention_grounding  # noqa: E402  (the attention readout replaces zk0lib.base's grounding head)

from zk0lib import model  # noqa: E402


def _wide_tiny_vlm_folder(dest):
    model._write_vlm_folder(
        dest,
        text={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 1024,
            "rope_theta": 10000.0,
        },
        vision={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": model.TINY_IMAGE_SIZE,
            "patch_size": 8,
        },
        scale_factor=2,
    )


model._tiny_vlm_folder = _wide_tiny_vlm_folder

if __name__ == "__main__":
    attention_grounding.main()
