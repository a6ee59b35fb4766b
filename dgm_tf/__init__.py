"""dgm_tf: Dynamic Generative Memory (Ostapenko et al., CVPR 2019) for class-incremental learning in TensorFlow/Keras."""
