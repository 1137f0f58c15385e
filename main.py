#!/usr/bin/env python3
"""Adversarial training and white-box evaluation of ImageNet classifiers (Feature Denoising).

Train:          python main.py --data DIR --batch 32 --attack-iter 30 --arch ResNet -d 50
Evaluate:       python main.py --eval --load CKPT --data DIR --attack-iter 100 --arch ResNet -d 152
Predict:        python main.py --eval-directory DIR --prediction-file out.txt --load CKPT ...
Demo:           python main.py --demo
The command line is ``iat.app.cli``; everything else lives in the ``iat`` package (README: Layout).
"""

import sys

from iat.app.cli import build_parser, config_from_args, main

__all__ = ["build_parser", "config_from_args", "main"]

if __name__ == "__main__":
    sys.exit(main())
