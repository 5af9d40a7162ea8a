"""fasterkd: resolution-path distillation and pixel-shuffle prediction for FasterSeg.

A reproduction of Yang, Xue, Qi and Xin, "Improving Efficient Semantic Segmentation Networks by
Enhancing Multi-scale Feature Representation via Resolution Path Based Knowledge Distillation and
Pixel Shuffle" (ISVC 2021), as a library and a research book.
"""

__version__ = "0.1.0"
