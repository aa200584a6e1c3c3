"""Which policy governs a check: central configuration > node file > inline fields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sync.api_errors import ApiError, UnknownNamespace
from sync.policy import Policy, build_policy

InlineFields = tuple[object, object, object, object, object, object, object]
INLINE_LABEL = "inline"  # metrics label shared by all inline namespaces
_INLINE_CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class NamespaceConfig:
    policy: Policy
    overrides: Mapping[str, Policy] = field(default_factory=dict)  # identifier hash -> policy


class PolicyResolver:
    def __init__(self, *, file_namespaces: Mapping[str, NamespaceConfig] | None = None,
                 inline_enabled: bool = True, max_inline_namespaces: int = 1000) -> None:
        self._file = dict(file_namespaces or {})
        self._central: dict[str, NamespaceConfig] = {}
        self._configured = self._file
        self._inline_enabled = inline_enabled
        self._max_inline = max_inline_namespaces
        self._inline_names: set[str] = set()
        self._inline_policies: dict[tuple[str, InlineFields], Policy] = {}
        self.central_version = 0

    def set_central(self, namespaces: Mapping[str, NamespaceConfig], version: int) -> None:
        """Replace central's configuration at once; it wins over the file per namespace."""
        self._central = dict(namespaces)
        self._configured = {**self._file, **self._central}
        self.central_version = version

    def is_configured(self, namespace: str) -> bool:
        return namespace in self._configured

    def label(self, namespace: str) -> str:
        return namespace if namespace in self._configured else INLINE_LABEL

    def configured(self, namespace: str) -> NamespaceConfig | None:
        return self._configured.get(namespace)

    def resolve(self, namespace: str, key_hash: str, inline: InlineFields | None) -> Policy:
        config = self._configured.get(namespace)
        if config is not None:
            return config.overrides.get(key_hash, config.policy)
        if inline is None:
            raise UnknownNamespace(namespace)
        return self.inline(namespace, inline)

    def inline(self, namespace: str, inline: InlineFields) -> Policy:
        """The policy of an unconfigured namespace from a check's own fields."""
        cache_key: tuple[str, InlineFields] | None = (namespace, inline)
        try:
            policy = self._inline_policies.get((namespace, inline))
        except TypeError:  # a list or object where a scalar belongs; build_policy names it
            cache_key, policy = None, None
        if policy is not None:
            return policy
        if not self._inline_enabled:
            raise ApiError(422, "inline_disabled", "inline policies are disabled on this "
                           "node; use a configured namespace", "limit")
        if namespace not in self._inline_names and len(self._inline_names) >= self._max_inline:
            raise ApiError(422, "too_many_inline_namespaces",
                           f"this node already serves {self._max_inline} inline namespaces",
                           "namespace")
        limit, duration, algorithm, burst, mode, on_unavailable, timeout = inline
        policy = build_policy(limit=limit, duration=duration, algorithm=algorithm, burst=burst,
                              mode=mode, on_unavailable=on_unavailable, timeout=timeout)
        if cache_key is not None:
            if len(self._inline_policies) >= _INLINE_CACHE_MAX:
                self._inline_policies.clear()
            self._inline_policies[cache_key] = policy
        self._inline_names.add(namespace)
        return policy
