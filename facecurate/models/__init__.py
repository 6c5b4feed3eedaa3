"""Model zoo: one small class per model family (dlib HOG / MMOD detectors, dlib
landmarks and descriptor, SCRFD and ArcFace ONNX graphs)."""
