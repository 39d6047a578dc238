"""The shipped base models (``<preset>.pt``), their model cards (``<preset>.md``) and
``registry.json`` (name, file, card, sha256 of the file, sequences), read by
:mod:`PatientFineTuneLib.modelcard`. Package data: the wheel, the editable install and the
Slicer extension carry the same files. ``Resources/Models/build_models.py`` writes them."""
