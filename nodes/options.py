"""Node inputs built from the library's option tables (comfy_dg/options.py): one home for defaults and ranges."""
from comfy_api.latest import io

from comfy_dg.options import GUIDANCE, Option


def widget(option: Option, **overrides):
    """The V3 input of one option (widget value none_is stands for "not set")."""
    o, kw = option, {"tooltip": option.help, **overrides}
    default = o.none_is if o.default is None else o.default
    if o.kind is bool:
        return io.Boolean.Input(o.name, default=default, **kw)
    if o.kind is str and o.choices is None:
        return io.String.Input(o.name, default=default, **kw)
    if o.kind is str:
        return io.Combo.Input(o.name, options=list(o.choices), default=default, **kw)
    if o.kind is int:
        return io.Int.Input(o.name, default=default, min=o.min, max=o.max, **kw)
    return io.Float.Input(o.name, default=default, min=o.min, max=o.max, step=o.step, round=False, **kw)


def widgets(table: dict, *names: str, **overrides):
    """The inputs of these options, in this order (all of the table's node options when no names are given)."""
    names = names or [n for n, o in table.items() if o.node]
    return [widget(table[n], **overrides) for n in names]


def judged_class():
    """The optional class inputs of the nodes that judge with a discriminator (Rank by Realism, the rejection
    sampler): by label or by the name stored in the file."""
    return [widget(GUIDANCE["class_label"], optional=True,
                   tooltip="For a class-conditional discriminator: the class to judge against (-1: none)."),
            widget(GUIDANCE["class_name"], optional=True,
                   tooltip="For a class-conditional discriminator: the class to judge against by the name stored "
                           "in the file, instead of class_label (empty: use class_label).")]
