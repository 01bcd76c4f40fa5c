"""Wire types of the control protocol, with Go's JSON names and omit rules.

Transcribed field by field from tailcfg/tailcfg.go, tailcfg/derpmap.go and
types/dnstype/dnstype.go at tailscale v1.90.9. Attribute names are the Go
JSON names (so ``Node.ID``, ``SSHPolicy.rules``); the omit option of each field
is its Go tag: ``omitempty`` is the default here, ``NEVER`` marks fields
without one, ``ZERO`` marks ``omitzero``.

Value conventions (see protocol/gojson.py): ``X | None`` is a Go pointer, nil
slice or nil map (None = null/absent); keys default to the zero key;
``datetime`` fields default to Go's zero time; ``opt.Bool`` is ``bool | None``;
netip prefixes, addresses and addr:ports are strings; raw JSON (CapMap values,
TKAInfo) is ``Any``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from protocol.gojson import (
    ADDR,
    ADDR_PORT,
    INT32,
    NEVER,
    NIL,
    PREFIX,
    ROUTE,
    UINT16,
    UINT64,
    ZERO,
    ZERO_TIME,
    IntRange,
    MaxItems,
    RemoteWireError,
    Wire,
    wire_field,
)
from protocol.keys import (
    ChallengePublic,
    DiscoPublic,
    MachinePublic,
    NLPublic,
    NodePublic,
    _Key32,
)

# tailcfg.go: capability version of the client the protocol notes target (1.90.9).
CURRENT_CAPABILITY_VERSION = 130
# The oldest client homescale keeps working (1.56).
MIN_SUPPORTED_CAPABILITY_VERSION = 82

# tailcfg.LBHeader: load-balancer hint the client puts on Noise requests.
LB_HEADER = "Ts-Lb"


class HardwareAttestationPublic(_Key32):
    """types/key/hardware_attestation.go; capver 130 may send it, we ignore it."""

    PREFIX = "hwattestpub:"


# Typed strings: validated on decode with Go's net/netip rules (protocol/netip.py).
AddrPortText = Annotated[str, ADDR_PORT]  # netip.AddrPort
AddrText = Annotated[str, ADDR]  # netip.Addr
PrefixText = Annotated[str, PREFIX]  # netip.Prefix
RouteText = Annotated[str, ROUTE]  # netip.Prefix a node advertises: no host bits
Uint16 = Annotated[int, UINT16]
Uint64 = Annotated[int, UINT64]
# CapabilityVersion, EndpointType, DERP region IDs...: Go ints that are small in
# practice; anything beyond int32 is a client bug or an attack.
SmallInt = Annotated[int, INT32]
NonNegInt = Annotated[int, IntRange(0, (1 << 31) - 1)]
# List caps for what a node reports about itself: generous, but bounded.
MAX_ENDPOINTS = 1024
MAX_ROUTES = 1024
MAX_SMALL_LIST = 256


def _key(cls: type[_Key32], omit: str = NEVER) -> Any:
    return wire_field(default_factory=cls.zero, omit=omit)


def _time(omit: str = NEVER) -> Any:
    return wire_field(default=ZERO_TIME, omit=omit)


# --- registration ---------------------------------------------------------------


class Oauth2Token(Wire):
    """golang.org/x/oauth2 Token, sent by very old Android clients only."""

    access_token: str = wire_field(default="")
    token_type: str = wire_field(default="")
    refresh_token: str = wire_field(default="")
    expiry: datetime | None = wire_field(default=None)


class RegisterResponseAuth(Wire):
    Oauth2Token: Oauth2Token | None = wire_field(default=None)
    AuthKey: str = wire_field(default="")


class RegisterRequest(Wire):
    Version: NonNegInt = wire_field(default=0, omit=NEVER)
    NodeKey: NodePublic = _key(NodePublic)
    OldNodeKey: NodePublic = _key(NodePublic)
    NLKey: NLPublic = _key(NLPublic)
    Auth: RegisterResponseAuth | None = wire_field(default=None)
    # Unix 123 means "log me out" (direct.go TryLogout).
    Expiry: datetime = _time()
    Followup: str = wire_field(default="", omit=NEVER)
    Hostinfo: Hostinfo | None = wire_field(default=None, omit=NEVER)
    Ephemeral: bool = wire_field(default=False)
    NodeKeySignature: bytes | None = wire_field(default=None, omit=NEVER)
    SignatureType: SmallInt = wire_field(default=0)
    Timestamp: datetime | None = wire_field(default=None)
    DeviceCert: bytes | None = wire_field(default=None)
    Signature: bytes | None = wire_field(default=None)
    Tailnet: str = wire_field(default="")

    def _validate(self, path: str) -> None:
        _require_node_key(self.NodeKey, path)


class User(Wire):
    ID: int = wire_field(default=0, omit=NEVER)
    DisplayName: str = wire_field(default="", omit=NEVER)
    ProfilePicURL: str = wire_field(default="", omit=NEVER)
    Created: datetime = _time()


class Login(Wire):
    ID: int = wire_field(default=0, omit=NEVER)
    Provider: str = wire_field(default="", omit=NEVER)
    LoginName: str = wire_field(default="", omit=NEVER)
    DisplayName: str = wire_field(default="", omit=NEVER)
    ProfilePicURL: str = wire_field(default="", omit=NEVER)


class RegisterResponse(Wire):
    User: User = wire_field(default_factory=lambda: User(), omit=NEVER)
    Login: Login = wire_field(default_factory=lambda: Login(), omit=NEVER)
    NodeKeyExpired: bool = wire_field(default=False, omit=NEVER)
    MachineAuthorized: bool = wire_field(default=False, omit=NEVER)
    AuthURL: str = wire_field(default="", omit=NEVER)
    # Leave empty: a signature here makes the client re-register (tailnet lock).
    NodeKeySignature: bytes | None = wire_field(default=None, omit=NEVER)
    Error: str = wire_field(default="", omit=NEVER)


# --- hostinfo -------------------------------------------------------------------


class Service(Wire):
    Proto: str = wire_field(default="", omit=NEVER)
    Port: Uint16 = wire_field(default=0, omit=NEVER)
    Description: str = wire_field(default="")


class NetInfo(Wire):
    # opt.Bool fields without omitempty marshal as null when unset.
    MappingVariesByDestIP: bool | None = wire_field(default=None, omit=NEVER)
    HairPinning: bool | None = wire_field(default=None, omit=NEVER)
    WorkingIPv6: bool | None = wire_field(default=None, omit=NEVER)
    OSHasIPv6: bool | None = wire_field(default=None, omit=NEVER)
    WorkingUDP: bool | None = wire_field(default=None, omit=NEVER)
    WorkingICMPv4: bool | None = wire_field(default=None, omit=NEVER)
    HavePortMap: bool = wire_field(default=False)
    UPnP: bool | None = wire_field(default=None, omit=NEVER)
    PMP: bool | None = wire_field(default=None, omit=NEVER)
    PCP: bool | None = wire_field(default=None, omit=NEVER)
    # A DERP region ID; peers get it as Node.HomeDERP (Go int).
    PreferredDERP: NonNegInt = wire_field(default=0, omit=NEVER)
    LinkType: str = wire_field(default="")
    DERPLatency: Annotated[dict[str, float], MaxItems(MAX_SMALL_LIST)] | None = wire_field(
        default=None
    )
    FirewallMode: str = wire_field(default="")


class Location(Wire):
    Country: str = wire_field(default="")
    CountryCode: str = wire_field(default="")
    City: str = wire_field(default="")
    CityCode: str = wire_field(default="")
    Latitude: float = wire_field(default=0.0)
    Longitude: float = wire_field(default=0.0)
    Priority: SmallInt = wire_field(default=0)


class TPMInfo(Wire):
    Manufacturer: str = wire_field(default="")
    Vendor: str = wire_field(default="")
    Model: int = wire_field(default=0)
    FirmwareVersion: Uint64 = wire_field(default=0)
    SpecRevision: int = wire_field(default=0)
    FamilyIndicator: str = wire_field(default="")


class Hostinfo(Wire):
    IPNVersion: str = wire_field(default="")
    FrontendLogID: str = wire_field(default="")
    BackendLogID: str = wire_field(default="")
    OS: str = wire_field(default="")
    OSVersion: str = wire_field(default="")
    Container: bool | None = wire_field(default=None)
    Env: str = wire_field(default="")
    Distro: str = wire_field(default="")
    DistroVersion: str = wire_field(default="")
    DistroCodeName: str = wire_field(default="")
    App: str = wire_field(default="")
    Desktop: bool | None = wire_field(default=None)
    Package: str = wire_field(default="")
    DeviceModel: str = wire_field(default="")
    PushDeviceToken: str = wire_field(default="")
    Hostname: str = wire_field(default="")
    ShieldsUp: bool = wire_field(default=False)
    ShareeNode: bool = wire_field(default=False)
    NoLogsNoSupport: bool = wire_field(default=False)
    WireIngress: bool = wire_field(default=False)
    IngressEnabled: bool = wire_field(default=False)
    AllowsUpdate: bool = wire_field(default=False)
    Machine: str = wire_field(default="")
    GoArch: str = wire_field(default="")
    GoArchVar: str = wire_field(default="")
    GoVersion: str = wire_field(default="")
    RoutableIPs: Annotated[list[RouteText], MaxItems(MAX_ROUTES)] | None = wire_field(default=None)
    RequestTags: Annotated[list[str], MaxItems(MAX_SMALL_LIST)] | None = wire_field(default=None)
    WoLMACs: Annotated[list[str], MaxItems(MAX_SMALL_LIST)] | None = wire_field(default=None)
    Services: Annotated[list[Service], MaxItems(MAX_ROUTES)] | None = wire_field(default=None)
    NetInfo: NetInfo | None = wire_field(default=None)
    sshHostKeys: Annotated[list[str], MaxItems(MAX_SMALL_LIST)] | None = wire_field(default=None)
    Cloud: str = wire_field(default="")
    Userspace: bool | None = wire_field(default=None)
    UserspaceRouter: bool | None = wire_field(default=None)
    AppConnector: bool | None = wire_field(default=None)
    ServicesHash: str = wire_field(default="")
    ExitNodeID: str = wire_field(default="", omit=ZERO)
    Location: Location | None = wire_field(default=None)
    TPM: TPMInfo | None = wire_field(default=None)
    StateEncrypted: bool | None = wire_field(default=None)


# --- DNS ------------------------------------------------------------------------


class Resolver(Wire):
    """types/dnstype.Resolver."""

    Addr: str = wire_field(default="")
    BootstrapResolution: list[str] | None = wire_field(default=None)
    UseWithExitNode: bool = wire_field(default=False)


class DNSRecord(Wire):
    Name: str = wire_field(default="", omit=NEVER)
    Type: str = wire_field(default="")
    Value: str = wire_field(default="", omit=NEVER)


class DNSConfig(Wire):
    Resolvers: list[Resolver] | None = wire_field(default=None)
    # An empty list for a suffix means "answered by 100.100.100.100" (split DNS).
    Routes: dict[str, list[Resolver] | None] | None = wire_field(default=None)
    FallbackResolvers: list[Resolver] | None = wire_field(default=None)
    Domains: list[str] | None = wire_field(default=None)
    Proxied: bool = wire_field(default=False)
    Nameservers: list[str] | None = wire_field(default=None)
    CertDomains: list[str] | None = wire_field(default=None)
    ExtraRecords: list[DNSRecord] | None = wire_field(default=None)
    ExitNodeFilteredSet: list[str] | None = wire_field(default=None)
    TempCorpIssue13969: str = wire_field(default="")


# --- DERP map -------------------------------------------------------------------


class DERPNode(Wire):
    Name: str = wire_field(default="", omit=NEVER)
    RegionID: NonNegInt = wire_field(default=0, omit=NEVER)
    HostName: str = wire_field(default="", omit=NEVER)
    CertName: str = wire_field(default="")
    IPv4: str = wire_field(default="")
    IPv6: str = wire_field(default="")
    # 0 means 3478, -1 disables STUN on this node (tailcfg/derpmap.go).
    STUNPort: Annotated[int, IntRange(-1, 0xFFFF)] = wire_field(default=0)
    STUNOnly: bool = wire_field(default=False)
    DERPPort: Uint16 = wire_field(default=0)
    InsecureForTests: bool = wire_field(default=False)
    STUNTestIP: str = wire_field(default="")
    CanPort80: bool = wire_field(default=False)


class DERPRegion(Wire):
    RegionID: NonNegInt = wire_field(default=0, omit=NEVER)
    RegionCode: str = wire_field(default="", omit=NEVER)
    RegionName: str = wire_field(default="", omit=NEVER)
    Latitude: float = wire_field(default=0.0)
    Longitude: float = wire_field(default=0.0)
    Avoid: bool = wire_field(default=False)
    NoMeasureNoHome: bool = wire_field(default=False)
    Nodes: list[DERPNode] | None = wire_field(default=None, omit=NEVER)


class DERPHomeParams(Wire):
    RegionScore: dict[int, float] | None = wire_field(default=None)


class DERPMap(Wire):
    HomeParams: DERPHomeParams | None = wire_field(default=None)
    # Never put a None region in here: older clients crash on it (PROTOCOL.md 7.2.17).
    Regions: dict[int, DERPRegion] | None = wire_field(default=None, omit=NEVER)
    omitDefaultRegions: bool = wire_field(default=False)


# --- packet filter --------------------------------------------------------------


class PortRange(Wire):
    First: Uint16 = wire_field(default=0, omit=NEVER)
    Last: Uint16 = wire_field(default=0, omit=NEVER)


class NetPortRange(Wire):
    IP: str = wire_field(default="", omit=NEVER)
    Bits: int | None = wire_field(default=None)
    Ports: PortRange = wire_field(default_factory=lambda: PortRange(), omit=NEVER)


class CapGrant(Wire):
    Dsts: list[str] | None = wire_field(default=None, omit=NEVER)
    Caps: list[str] | None = wire_field(default=None)
    CapMap: dict[str, Any] | None = wire_field(default=None)


class FilterRule(Wire):
    SrcIPs: list[str] | None = wire_field(default=None, omit=NEVER)
    SrcBits: list[int] | None = wire_field(default=None)
    DstPorts: list[NetPortRange] | None = wire_field(default=None)
    IPProto: list[int] | None = wire_field(default=None)
    CapGrant: list[CapGrant] | None = wire_field(default=None)


# tailcfg.FilterAllowAll
def filter_allow_all() -> list[FilterRule]:
    return [
        FilterRule(
            SrcIPs=["*"],
            DstPorts=[NetPortRange(IP="*", Ports=PortRange(First=0, Last=65535))],
        )
    ]


# --- SSH ------------------------------------------------------------------------


class SSHPrincipal(Wire):
    node: str = wire_field(default="")
    nodeIP: str = wire_field(default="")
    userLogin: str = wire_field(default="")
    any: bool = wire_field(default=False)
    pubKeys: list[str] | None = wire_field(default=None)


class SSHRecorderFailureAction(Wire):
    RejectSessionWithMessage: str = wire_field(default="")
    TerminateSessionWithMessage: str = wire_field(default="")
    NotifyURL: str = wire_field(default="")


class SSHAction(Wire):
    message: str = wire_field(default="")
    reject: bool = wire_field(default=False)
    accept: bool = wire_field(default=False)
    # time.Duration: integer nanoseconds.
    sessionDuration: int = wire_field(default=0)
    allowAgentForwarding: bool = wire_field(default=False)
    holdAndDelegate: str = wire_field(default="")
    allowLocalPortForwarding: bool = wire_field(default=False)
    allowRemotePortForwarding: bool = wire_field(default=False)
    recorders: list[str] | None = wire_field(default=None)
    onRecordingFailure: SSHRecorderFailureAction | None = wire_field(default=None)


class SSHRule(Wire):
    ruleExpires: datetime | None = wire_field(default=None)
    principals: list[SSHPrincipal] | None = wire_field(default=None, omit=NEVER)
    sshUsers: dict[str, str] | None = wire_field(default=None, omit=NEVER)
    action: SSHAction | None = wire_field(default=None, omit=NEVER)
    acceptEnv: list[str] | None = wire_field(default=None)


class SSHPolicy(Wire):
    rules: list[SSHRule] | None = wire_field(default=None, omit=NEVER)


# --- nodes and users ------------------------------------------------------------


class UserProfile(Wire):
    ID: int = wire_field(default=0, omit=NEVER)
    LoginName: str = wire_field(default="", omit=NEVER)
    DisplayName: str = wire_field(default="", omit=NEVER)
    ProfilePicURL: str = wire_field(default="")


class Node(Wire):
    ID: int = wire_field(default=0, omit=NEVER)
    StableID: str = wire_field(default="", omit=NEVER)
    # FQDN with the trailing dot; the client derives the MagicDNS suffix from it.
    Name: str = wire_field(default="", omit=NEVER)
    User: int = wire_field(default=0, omit=NEVER)
    Sharer: int = wire_field(default=0)
    Key: NodePublic = _key(NodePublic)
    KeyExpiry: datetime = _time()
    KeySignature: bytes | None = wire_field(default=None)
    Machine: MachinePublic = _key(MachinePublic)
    DiscoKey: DiscoPublic = _key(DiscoPublic)
    Addresses: list[PrefixText] | None = wire_field(default=None, omit=NEVER)
    AllowedIPs: list[PrefixText] | None = wire_field(default=None, omit=NEVER)
    Endpoints: list[AddrPortText] | None = wire_field(default=None)
    LegacyDERPString: str = wire_field(default="", json="DERP")
    HomeDERP: NonNegInt = wire_field(default=0)
    # A HostinfoView: null when unset, which some client code dereferences, so
    # the netmap builder should always fill it.
    Hostinfo: Hostinfo | None = wire_field(default=None, omit=NEVER)
    Created: datetime = _time()
    Cap: int = wire_field(default=0)
    Tags: list[str] | None = wire_field(default=None)
    PrimaryRoutes: list[PrefixText] | None = wire_field(default=None)
    LastSeen: datetime | None = wire_field(default=None)
    Online: bool | None = wire_field(default=None)
    MachineAuthorized: bool = wire_field(default=False)
    Capabilities: list[str] | None = wire_field(default=None)
    CapMap: dict[str, Any] | None = wire_field(default=None)
    UnsignedPeerAPIOnly: bool = wire_field(default=False)
    # Computed by the client; present in client-side dumps, never sent by a server.
    ComputedName: str = wire_field(default="")
    ComputedNameWithHost: str = wire_field(default="")
    DataPlaneAuditLogID: str = wire_field(default="")
    Expired: bool = wire_field(default=False)
    SelfNodeV4MasqAddrForThisPeer: AddrText | None = wire_field(default=None)
    SelfNodeV6MasqAddrForThisPeer: AddrText | None = wire_field(default=None)
    IsWireGuardOnly: bool = wire_field(default=False)
    IsJailed: bool = wire_field(default=False)
    ExitNodeDNSResolvers: list[Resolver] | None = wire_field(default=None)


class PeerChange(Wire):
    NodeID: int = wire_field(default=0, omit=NEVER)
    DERPRegion: NonNegInt = wire_field(default=0)
    Cap: int = wire_field(default=0)
    CapMap: dict[str, Any] | None = wire_field(default=None)
    Endpoints: list[AddrPortText] | None = wire_field(default=None)
    Key: NodePublic | None = wire_field(default=None)
    KeySignature: bytes | None = wire_field(default=None)
    DiscoKey: DiscoPublic | None = wire_field(default=None)
    Online: bool | None = wire_field(default=None)
    LastSeen: datetime | None = wire_field(default=None)
    KeyExpiry: datetime | None = wire_field(default=None)


# --- map request / response -----------------------------------------------------


class MapRequest(Wire):
    Version: NonNegInt = wire_field(default=0, omit=NEVER)
    Compress: str = wire_field(default="", omit=NEVER)
    KeepAlive: bool = wire_field(default=False, omit=NEVER)
    NodeKey: NodePublic = _key(NodePublic)
    DiscoKey: DiscoPublic = _key(DiscoPublic)
    HardwareAttestationKey: HardwareAttestationPublic = _key(HardwareAttestationPublic, ZERO)
    HardwareAttestationKeySignature: bytes | None = wire_field(default=None)
    HardwareAttestationKeySignatureTimestamp: datetime = _time(ZERO)
    Stream: bool = wire_field(default=False, omit=NEVER)
    Hostinfo: Hostinfo | None = wire_field(default=None, omit=NEVER)
    MapSessionHandle: str = wire_field(default="")
    MapSessionSeq: int = wire_field(default=0)
    Endpoints: Annotated[list[AddrPortText], MaxItems(MAX_ENDPOINTS)] | None = wire_field(
        default=None
    )
    EndpointTypes: Annotated[list[SmallInt], MaxItems(MAX_ENDPOINTS)] | None = wire_field(
        default=None
    )
    TKAHead: str = wire_field(default="")
    ReadOnly: bool = wire_field(default=False)
    OmitPeers: bool = wire_field(default=False)
    DebugFlags: Annotated[list[str], MaxItems(MAX_SMALL_LIST)] | None = wire_field(default=None)
    ConnectionHandleForTest: str = wire_field(default="")

    def _validate(self, path: str) -> None:
        _require_node_key(self.NodeKey, path)


class PingRequest(Wire):
    URL: str = wire_field(default="", omit=NEVER)
    URLIsNoise: bool = wire_field(default=False)
    Log: bool = wire_field(default=False)
    Types: str = wire_field(default="")
    IP: str = wire_field(default="", omit=NEVER)
    Payload: bytes | None = wire_field(default=None)


class Debug(Wire):
    SleepSeconds: float = wire_field(default=0.0)
    DisableLogTail: bool = wire_field(default=False)
    # Never set by homescale: the client calls os.Exit with it.
    Exit: int | None = wire_field(default=None)


class ClientVersion(Wire):
    RunningLatest: bool = wire_field(default=False)
    LatestVersion: str = wire_field(default="")
    UrgentSecurityUpdate: bool = wire_field(default=False)
    Notify: bool = wire_field(default=False)
    NotifyURL: str = wire_field(default="")
    NotifyText: str = wire_field(default="")


class ControlIPCandidate(Wire):
    IP: str = wire_field(default="", omit=ZERO)
    ACEHost: str = wire_field(default="")
    DialStartDelaySec: float = wire_field(default=0.0)
    DialTimeoutSec: float = wire_field(default=0.0)
    Priority: int = wire_field(default=0)


class ControlDialPlan(Wire):
    Candidates: list[ControlIPCandidate] | None = wire_field(default=None, omit=NEVER)


class DisplayMessageAction(Wire):
    URL: str = wire_field(default="", omit=NEVER)
    Label: str = wire_field(default="", omit=NEVER)


class DisplayMessage(Wire):
    Title: str = wire_field(default="", omit=NEVER)
    Text: str = wire_field(default="", omit=NEVER)
    Severity: str = wire_field(default="", omit=NEVER)
    ImpactsConnectivity: bool = wire_field(default=False)
    PrimaryAction: DisplayMessageAction | None = wire_field(default=None)


# Inside MapResponse the field ``Node`` shadows the class for type checkers; the
# annotations there name the class through this alias.
_Node = Node


class MapResponse(Wire):
    MapSessionHandle: str = wire_field(default="")
    Seq: int = wire_field(default=0)
    KeepAlive: bool = wire_field(default=False)
    PingRequest: PingRequest | None = wire_field(default=None)
    PopBrowserURL: str = wire_field(default="")
    Node: _Node | None = wire_field(default=None)
    DERPMap: DERPMap | None = wire_field(default=None)
    # Non-empty Peers replaces the whole peer set (map.go); deltas use the next three.
    Peers: list[_Node] | None = wire_field(default=None)
    PeersChanged: list[_Node] | None = wire_field(default=None)
    PeersRemoved: list[int] | None = wire_field(default=None)
    PeersChangedPatch: list[PeerChange] | None = wire_field(default=None)
    PeerSeenChange: dict[int, bool] | None = wire_field(default=None)
    OnlineChange: dict[int, bool] | None = wire_field(default=None)
    DNSConfig: DNSConfig | None = wire_field(default=None)
    Domain: str = wire_field(default="")
    CollectServices: bool | None = wire_field(default=None)
    # Deliberately not Go's omitempty: a present-but-empty PacketFilter means
    # "block everything" to the client, which Go's encoder cannot express but a
    # server must be able to. None = unchanged (absent).
    PacketFilter: list[FilterRule] | None = wire_field(default=None, omit=NIL)
    PacketFilters: dict[str, list[FilterRule] | None] | None = wire_field(default=None)
    UserProfiles: list[UserProfile] | None = wire_field(default=None)
    Health: list[str] | None = wire_field(default=None)
    DisplayMessages: dict[str, DisplayMessage | None] | None = wire_field(default=None)
    SSHPolicy: SSHPolicy | None = wire_field(default=None)
    ControlTime: datetime | None = wire_field(default=None)
    TKAInfo: Any = wire_field(default=None)
    DomainDataPlaneAuditLogID: str = wire_field(default="")
    Debug: Debug | None = wire_field(default=None)
    ControlDialPlan: ControlDialPlan | None = wire_field(default=None)
    ClientVersion: ClientVersion | None = wire_field(default=None)
    DefaultAutoUpdate: bool | None = wire_field(default=None)


# --- other Noise endpoints -------------------------------------------------------


class EarlyNoise(Wire):
    nodeKeyChallenge: ChallengePublic = _key(ChallengePublic)


class OverTLSPublicKeyResponse(Wire):
    """The body of ``GET /key?v=N``; a zero legacy key is what headscale sends."""

    legacyPublicKey: MachinePublic = _key(MachinePublic)
    publicKey: MachinePublic = _key(MachinePublic)


class SetDNSRequest(Wire):
    Version: int = wire_field(default=0, omit=NEVER)
    NodeKey: NodePublic = _key(NodePublic)
    Name: str = wire_field(default="", omit=NEVER)
    Type: str = wire_field(default="", omit=NEVER)
    Value: str = wire_field(default="", omit=NEVER)


class TokenRequest(Wire):
    CapVersion: int = wire_field(default=0, omit=NEVER)
    NodeKey: NodePublic = _key(NodePublic)
    Audience: str = wire_field(default="", omit=NEVER)


class TokenResponse(Wire):
    id_token: str = wire_field(default="", omit=NEVER)


class HealthChangeRequest(Wire):
    Subsys: str = wire_field(default="", omit=NEVER)
    Error: str = wire_field(default="", omit=NEVER)
    NodeKey: NodePublic = _key(NodePublic)


def _require_node_key(key: NodePublic, path: str) -> None:
    # Go decodes "nodekey:000..." fine, but no node has it: it names nobody.
    if key.is_zero():
        raise RemoteWireError(f"{path}.NodeKey: the zero key {key} is not a node key")
