"""Tell someone when captions wait for review: a Prefect automation sending through a notification block.

The trigger is the flow run event Prefect emits when a run of a `lorapipe`-tagged deployment pauses or
suspends (the review form is waiting); the action sends the block's notification (Slack, Teams, email,
a webhook...) with a link to the run. `lorapipe serve --notify BLOCK` creates (or updates) it; the same
automation can be made by hand in the UI (Automations → +), see README.
"""

from __future__ import annotations

AUTOMATION_NAME = "lorapipe: captions wait for review"

BODY = (
    "Captions of {{ flow_run.name }} ({{ flow.name }}) wait for a person. Open the run and press Resume: "
    "{{ flow_run|ui_url }}"
)


def review_automation(block_document_id):
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    trigger = EventTrigger(
        expect={"prefect.flow-run.Paused", "prefect.flow-run.Suspended"},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.lorapipe"},
        posture=Posture.Reactive,
        threshold=1,
    )
    action = SendNotification(block_document_id=block_document_id, subject=AUTOMATION_NAME, body=BODY)
    return AutomationCore(name=AUTOMATION_NAME, description="Created by `lorapipe serve --notify`.",
                          trigger=trigger, actions=[action])


def ensure_review_notification(block: str) -> str:
    """Create or update the automation for the notification block `TYPE/NAME` (e.g. slack-webhook/team)."""
    import prefect.blocks.notifications  # noqa: F401  (registers the notification block types)
    from prefect.blocks.core import Block
    from prefect.client.orchestration import get_client

    if "/" not in block:
        raise ValueError(f"{block!r}: name the notification block as TYPE/NAME, e.g. slack-webhook/team")
    automation = review_automation(Block.load(block)._block_document_id)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        if existing:
            client.update_automation(existing[0].id, automation)
            return str(existing[0].id)
        return str(client.create_automation(automation))
