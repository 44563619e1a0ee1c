"""Vision pipeline building blocks: preprocessing, output decoders, NMS and detections.

- ``preprocess``: ``Preprocessor`` (frame -> engine input buffer) and ``FrameMeta``.
- ``decoders``: one module per output format and ``build_decoder``.
- ``nms``: vectorised class-aware NMS.
- ``detections``: ``Detections`` (boxes in source pixels, scores, class ids).
"""
