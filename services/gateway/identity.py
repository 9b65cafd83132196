"""Who makes a change through the API, as the audit log names them.

Authentication is a later issue: until then every change is made by this one actor. Every
controller takes it from here, so that the identities land in one place.
"""

from __future__ import annotations

ACTOR = "user:anonymous"
