from diffcli.cli import entry

entry()
