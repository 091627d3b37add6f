"""The quality and privacy report of a synthetic set: metrics (:mod:`.compute`), the self-contained HTML
page and figures (:mod:`.html`), and the ``report`` stage with its quality gate (:mod:`.stage`)."""
