"""Model zoo: one small module per model family (dlib HOG / MMOD detectors and
landmarks, dlib's ResNet, SCRFD, ArcFace ONNX, ONNX Runtime sessions), the
protocols the stages use (:mod:`.base`) and one door that builds them (:mod:`.zoo`)."""
