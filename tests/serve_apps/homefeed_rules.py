"""The rules module of the "homefeed" use-case of test_serve_e2e (added by config only)."""

from serve_apps.rules import rule


@rule("only_even_items", "pre")
def only_even_items(ctx, slate, arg):
    """A made-up business rule: homefeed shows even item ids only."""
    return slate.take(slate.item_id % 2 == 0)
