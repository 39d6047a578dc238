"""PatientFineTuneLib: patient-specific fine-tuning of a lesion-segmentation CNN.

Pure Python (torch, numpy, SimpleITK, scikit-image); no Slicer or Qt imports here, so the
same code runs from the command line, in notebooks and inside 3D Slicer.
"""

__version__ = "0.1.0"
