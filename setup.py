"""dgm_tf: Dynamic Generative Memory for class-incremental learning in TensorFlow 2 / Keras 3."""

from setuptools import find_packages, setup

setup(
    name="dgm_tf",
    version="0.1.0",
    description=(
        "Dynamic Generative Memory (Ostapenko et al., CVPR 2019) for class-incremental "
        "continual learning in TensorFlow 2 / Keras 3"
    ),
    python_requires=">=3.10",
    # tools/ is installed as dgm_tf_tools (a namespace package: tools/ has no __init__.py)
    # so that the dgm-tf-report command can import tools/report.py; the tools still run as
    # `python tools/<name>.py` from a checkout.
    packages=find_packages(include=["dgm_tf", "dgm_tf.*"]) + ["dgm_tf_tools"],
    package_dir={"dgm_tf_tools": "tools"},
    package_data={"dgm_tf.data": ["embedded/*.npz", "embedded/PROVENANCE.md"]},
    include_package_data=True,
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        "tensorflow-datasets>=4.9.10,<5",
        # tensorflow-datasets 4.9.10 imports importlib_resources but declares it only
        # for Python < 3.9.
        "importlib_resources",
        "tensorboard>=2.21,<2.22",
        # PredictionLog/PredictRequest protos: export warm-up records, tools/serving_request.py.
        "tensorflow-serving-api>=2.21,<2.22",
        "absl-py>=2.1",
        "numpy>=1.26",
    ],
    # report: tools/report.py (dgm-tf-report) plots with matplotlib; the core install stays lean.
    extras_require={"test": ["pytest>=8"], "report": ["matplotlib>=3.8"]},
    entry_points={"console_scripts": ["dgm-tf=dgm_tf.main:run", "dgm-tf-report=dgm_tf_tools.report:main"]},
)
