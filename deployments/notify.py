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
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if "/" not in block:
        raise ValueError(f"{block!r}: name the notification block as TYPE/NAME, e.g. slack-webhook/team")
    block_type, name = block.split("/", 1)
    with get_client(sync_client=True) as client:
        try:  # the block's id through the public API (not a Block's private _block_document_id)
            document = client.read_block_document_by_name(name, block_type, include_secrets=False)
        except ObjectNotFound:
            raise ValueError(f"{block!r}: no such notification block (create it in the UI: Blocks → +)") from None
        automation = review_automation(document.id)
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        if existing:
            client.update_automation(existing[0].id, automation)
            return str(existing[0].id)
        return str(client.create_automation(automation))
