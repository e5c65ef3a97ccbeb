"""The procedural world of coloured shapes: the toy datasets, the pixel judge behaviour tests score
images with, and the pretraining that built the embedded tiny model from it."""
