"""polydiff motion: text-to-motion diffusion on the SMPL 22-joint skeleton (HumanML3D's 263-d
features), BVH / stick-figure MP4 / NPY export and motion metrics."""
