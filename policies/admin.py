from django import forms
from django.contrib import admin, messages

from marketplace.admin import (IndexedSearch, across_pages_refused, api_rules_check, known_values_filter,
                               may_operate)
from marketplace.errors import ApplicationError
from policies import evaluation, services
from policies.models import ApprovalRequest, Policy
from policies.serializers import PolicySerializer

def _whole(amount):
    """The form's amount (a Decimal of no decimal places) as the API's JSON integer."""
    return None if amount is None else int(amount)


class PolicyForm(forms.ModelForm):
    """The policy as `PUT /agents/{id}/policies` takes it (lists of handles, service ids, tags, tokens): any other
    value saved here (a number, a string) failed every proposal of the agent, or matched what it was not meant to.
    The page carries the policy as it showed it (`shown`), so that what the operator changed from it is what is
    written (`services.policy_set_by_operator`), not every field."""

    shown = forms.JSONField(widget=forms.HiddenInput, required=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["shown"].initial = services.policy_as_shown(self.instance)

    def clean(self):
        cleaned = super().clean()
        if self.errors:
            return cleaned
        shown = cleaned.get("shown")
        if not isinstance(shown, dict) or set(shown) != set(services.POLICY_FIELDS):
            self.add_error(None, "This page did not say what it showed of the policy: open it again.")
            return cleaned
        data = {**{f"{name}_atomic": _whole(cleaned.get(name)) for name in services.LIMIT_FIELDS},
                **{name: cleaned.get(name) or [] for name in services.POLICY_FIELDS
                   if name not in services.LIMIT_FIELDS}}
        self.policy_data = api_rules_check(self, PolicySerializer, data,
                                           field_of=lambda name: name.removesuffix("_atomic"))
        agent = self.instance.agent if self.instance.agent_id else cleaned.get("agent")
        if agent is not None:
            try:
                services.policy_operator_check(agent=agent, operator=self.operator)
            except ApplicationError as refused:
                self.add_error(None, f"{refused.message} ({refused.code})")
        return cleaned


@admin.register(Policy)
class PolicyAdmin(admin.ModelAdmin):
    list_display = ("agent", "max_per_agreement", "daily_cap", "monthly_cap", "approval_threshold", "updated_at",
                    "updated_by")
    search_fields = ("agent__handle",)
    form = PolicyForm
    readonly_fields = ("updated_at", "updated_by")
    raw_id_fields = ("agent",)  # the agent's id (with Django's lookup), not a select of every agent
    list_select_related = ("agent", "updated_by")

    def get_readonly_fields(self, request, obj=None):
        # The agent is the policy's key: changed here, it replaced the other agent's policy with this one.
        return (*self.readonly_fields, "agent") if obj is not None else self.readonly_fields

    def has_delete_permission(self, request, obj=None):
        # Deleted, the agent's caps and rules were gone with no record of who did it: an operator loosens a policy
        # through its form, which policy_set_by_operator records under their name.
        return False

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        form.operator = request.user  # whose change the form checks (policy_operator_check)
        return form

    def save_model(self, request, obj, form, change):
        # Through the service, which takes the lock proposals take, so a cap never changes under a proposal.
        form.policy_changes = services.policy_set_by_operator(agent=obj.agent, operator=request.user,
                                                              shown=form.cleaned_data["shown"], data=form.policy_data)

    def construct_change_message(self, request, form, formsets, add=False):
        # The policy's admin history (with the operator's name): each field changed, from what to what.
        changes = "; ".join(f"{name}: {before} → {after}" for name, (before, after) in form.policy_changes.items())
        return f"{'Added' if add else 'Changed'} {changes or 'nothing'}."


def _decide(modeladmin, request, queryset, approve: bool):
    decided = 0
    for approval in queryset:
        try:
            services.approval_decide(approval=approval, actor=request.user, approve=approve, note="decided in admin")
            decided += 1
        except ApplicationError as error:
            messages.warning(request, f"{approval.pk}: {error.message}")
    messages.success(request, f"{'Approved' if approve else 'Rejected'} {decided} request(s).")


@admin.action(description="Approve selected requests", permissions=["decide"])
def approve_requests(modeladmin, request, queryset):
    if across_pages_refused(request, "approve"):  # a consent to pay is given to requests the operator sees
        return
    _decide(modeladmin, request, queryset, approve=True)


@admin.action(description="Reject selected requests", permissions=["decide"])
def reject_requests(modeladmin, request, queryset):
    if across_pages_refused(request, "reject"):  # a refusal, too, is the owner's answer: given to requests seen
        return
    _decide(modeladmin, request, queryset, approve=False)


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(IndexedSearch, admin.ModelAdmin):
    show_full_result_count = False  # a searched list counts the rows it shows, not every request again
    sortable_by = ("id", "created_at")  # the columns an index reads in order (IndexedSearch)
    list_display = ("id", "agent", "amount", "rule", "status", "created_at", "expires_at", "decided_by")
    # The rules the code names, not a `SELECT DISTINCT rule` of every request on each view of the list.
    list_filter = ("status", known_values_filter("rule", lambda: evaluation.APPROVAL_RULES))
    search_fields = ("id", "subject_id", "agent__handle")
    list_select_related = ("agent", "decided_by")
    actions = [approve_requests, reject_requests]

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in ApprovalRequest._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False  # decided by the actions (policies.services), never edited

    def has_delete_permission(self, request, obj=None):
        return False  # the owner's decision (or the request it waits on) is the audit trail of a payment

    def has_decide_permission(self, request) -> bool:
        return may_operate(request, ApprovalRequest)


