"""Pretrained speech encoders as a feature stage (see docs/method.md, "Audio representations").

``registry`` (pure, no torch) names the packaged encoders and their weights' sha256;
``weights`` finds and verifies the packaged files; ``ct2_format`` parses CTranslate2
``model.bin`` files; ``whisper`` is msata's own torch port of the Whisper encoder;
``stage`` turns a wave into timestamped hidden states.
"""
