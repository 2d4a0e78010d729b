"""The training lab of the bundled tiny-shapes models: training, network builders, the tokenizer builder and the
research scripts that made diffcli/bundled/. Not part of the installed tool (the wheel packages diffcli* only);
run its modules from the repository root, e.g. `python -m lab.train --help`. See lab/README.md."""
