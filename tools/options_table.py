#!/usr/bin/env python3
"""Prints the Markdown table of a command's options from the command's own help
(`--experimental-dump-help`), so that the README's table and `--help` say the same thing:

    tools/options_table.py .build/release/syncbn-train train
    tools/options_table.py --update README.md     (rewrites every marked table from .build/release)

The README holds the output between the markers `<!-- options: syncbn-train train -->` and
`<!-- options end -->`; a test checks that it is current.
"""
import json
import os
import re
import subprocess
import sys


def table(command):
    dump = json.loads(subprocess.run(command + ["--experimental-dump-help"], check=True,
                                     capture_output=True, text=True).stdout)
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for argument in dump["command"]["arguments"]:
        if not argument.get("shouldDisplay", True):
            continue
        name = argument.get("preferredName", {})
        if name.get("kind") != "long" or name.get("name") in ("help", "version"):
            continue
        flag = "--" + name["name"]
        if argument["kind"] == "option":
            flag += " <" + argument.get("valueName", "value") + ">"
            default = argument.get("defaultValue")
            default = f"`{default}`" if default is not None else "—"
        else:
            default = "off"
        meaning = argument.get("abstract", "").replace("|", "\\|")
        rows.append(f"| `{flag}` | {default} | {meaning} |")
    return "\n".join(rows)


def update(path):
    products = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".build", "release")
    with open(path) as f:
        text = f.read()

    def replace(match):
        words = match.group(1).split()
        return f"<!-- options: {match.group(1)} -->\n{table([os.path.join(products, words[0])] + words[1:])}\n<!-- options end -->"

    text = re.sub(r"<!-- options: ([^>]*?) -->\n.*?<!-- options end -->", replace, text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--update":
        update(sys.argv[2])
    elif len(sys.argv) >= 2 and not sys.argv[1].startswith("-"):
        print(table(sys.argv[1:]))
    else:
        sys.exit("usage: options_table.py BINARY [SUBCOMMAND...] | options_table.py --update FILE")
