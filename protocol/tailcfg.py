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
from typing import Any

from protocol.gojson import NEVER, NIL, ZERO, ZERO_TIME, Wire, wire_field
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


def _key(cls: type[_Key32], omit: str = NEVER) -> Any:
    return wire_field(default_factory=cls.zero, omit=omit)


def _time(omit: str = NEVER) -> Any:
    return wire_field(default=ZERO_TIME, omit=omit)


# --- registration ---------------------------------------------------------------


class Oauth2Token(Wire):
    """golang.org/x/oauth2 Token, sent by very old Android clients only."""

    access_token: str = wire_field("")
    token_type: str = wire_field("")
    refresh_token: str = wire_field("")
    expiry: datetime | None = wire_field(None)


class RegisterResponseAuth(Wire):
    Oauth2Token: Oauth2Token | None = wire_field(None)
    AuthKey: str = wire_field("")


class RegisterRequest(Wire):
    Version: int = wire_field(0, omit=NEVER)
    NodeKey: NodePublic = _key(NodePublic)
    OldNodeKey: NodePublic = _key(NodePublic)
    NLKey: NLPublic = _key(NLPublic)
    Auth: RegisterResponseAuth | None = wire_field(None)
    # Unix 123 means "log me out" (direct.go TryLogout).
    Expiry: datetime = _time()
    Followup: str = wire_field("", omit=NEVER)
    Hostinfo: Hostinfo | None = wire_field(None, omit=NEVER)
    Ephemeral: bool = wire_field(False)
    NodeKeySignature: bytes | None = wire_field(None, omit=NEVER)
    SignatureType: int = wire_field(0)
    Timestamp: datetime | None = wire_field(None)
    DeviceCert: bytes | None = wire_field(None)
    Signature: bytes | None = wire_field(None)
    Tailnet: str = wire_field("")


class User(Wire):
    ID: int = wire_field(0, omit=NEVER)
    DisplayName: str = wire_field("", omit=NEVER)
    ProfilePicURL: str = wire_field("", omit=NEVER)
    Created: datetime = _time()


class Login(Wire):
    ID: int = wire_field(0, omit=NEVER)
    Provider: str = wire_field("", omit=NEVER)
    LoginName: str = wire_field("", omit=NEVER)
    DisplayName: str = wire_field("", omit=NEVER)
    ProfilePicURL: str = wire_field("", omit=NEVER)


class RegisterResponse(Wire):
    User: User = wire_field(default_factory=lambda: User(), omit=NEVER)
    Login: Login = wire_field(default_factory=lambda: Login(), omit=NEVER)
    NodeKeyExpired: bool = wire_field(False, omit=NEVER)
    MachineAuthorized: bool = wire_field(False, omit=NEVER)
    AuthURL: str = wire_field("", omit=NEVER)
    # Leave empty: a signature here makes the client re-register (tailnet lock).
    NodeKeySignature: bytes | None = wire_field(None, omit=NEVER)
    Error: str = wire_field("", omit=NEVER)


# --- hostinfo -------------------------------------------------------------------


class Service(Wire):
    Proto: str = wire_field("", omit=NEVER)
    Port: int = wire_field(0, omit=NEVER)
    Description: str = wire_field("")


class NetInfo(Wire):
    # opt.Bool fields without omitempty marshal as null when unset.
    MappingVariesByDestIP: bool | None = wire_field(None, omit=NEVER)
    HairPinning: bool | None = wire_field(None, omit=NEVER)
    WorkingIPv6: bool | None = wire_field(None, omit=NEVER)
    OSHasIPv6: bool | None = wire_field(None, omit=NEVER)
    WorkingUDP: bool | None = wire_field(None, omit=NEVER)
    WorkingICMPv4: bool | None = wire_field(None, omit=NEVER)
    HavePortMap: bool = wire_field(False)
    UPnP: bool | None = wire_field(None, omit=NEVER)
    PMP: bool | None = wire_field(None, omit=NEVER)
    PCP: bool | None = wire_field(None, omit=NEVER)
    PreferredDERP: int = wire_field(0, omit=NEVER)
    LinkType: str = wire_field("")
    DERPLatency: dict[str, float] | None = wire_field(None)
    FirewallMode: str = wire_field("")


class Location(Wire):
    Country: str = wire_field("")
    CountryCode: str = wire_field("")
    City: str = wire_field("")
    CityCode: str = wire_field("")
    Latitude: float = wire_field(0.0)
    Longitude: float = wire_field(0.0)
    Priority: int = wire_field(0)


class TPMInfo(Wire):
    Manufacturer: str = wire_field("")
    Vendor: str = wire_field("")
    Model: int = wire_field(0)
    FirmwareVersion: int = wire_field(0)
    SpecRevision: int = wire_field(0)
    FamilyIndicator: str = wire_field("")


class Hostinfo(Wire):
    IPNVersion: str = wire_field("")
    FrontendLogID: str = wire_field("")
    BackendLogID: str = wire_field("")
    OS: str = wire_field("")
    OSVersion: str = wire_field("")
    Container: bool | None = wire_field(None)
    Env: str = wire_field("")
    Distro: str = wire_field("")
    DistroVersion: str = wire_field("")
    DistroCodeName: str = wire_field("")
    App: str = wire_field("")
    Desktop: bool | None = wire_field(None)
    Package: str = wire_field("")
    DeviceModel: str = wire_field("")
    PushDeviceToken: str = wire_field("")
    Hostname: str = wire_field("")
    ShieldsUp: bool = wire_field(False)
    ShareeNode: bool = wire_field(False)
    NoLogsNoSupport: bool = wire_field(False)
    WireIngress: bool = wire_field(False)
    IngressEnabled: bool = wire_field(False)
    AllowsUpdate: bool = wire_field(False)
    Machine: str = wire_field("")
    GoArch: str = wire_field("")
    GoArchVar: str = wire_field("")
    GoVersion: str = wire_field("")
    RoutableIPs: list[str] | None = wire_field(None)
    RequestTags: list[str] | None = wire_field(None)
    WoLMACs: list[str] | None = wire_field(None)
    Services: list[Service] | None = wire_field(None)
    NetInfo: NetInfo | None = wire_field(None)
    sshHostKeys: list[str] | None = wire_field(None)
    Cloud: str = wire_field("")
    Userspace: bool | None = wire_field(None)
    UserspaceRouter: bool | None = wire_field(None)
    AppConnector: bool | None = wire_field(None)
    ServicesHash: str = wire_field("")
    ExitNodeID: str = wire_field("", omit=ZERO)
    Location: Location | None = wire_field(None)
    TPM: TPMInfo | None = wire_field(None)
    StateEncrypted: bool | None = wire_field(None)


# --- DNS ------------------------------------------------------------------------


class Resolver(Wire):
    """types/dnstype.Resolver."""

    Addr: str = wire_field("")
    BootstrapResolution: list[str] | None = wire_field(None)
    UseWithExitNode: bool = wire_field(False)


class DNSRecord(Wire):
    Name: str = wire_field("", omit=NEVER)
    Type: str = wire_field("")
    Value: str = wire_field("", omit=NEVER)


class DNSConfig(Wire):
    Resolvers: list[Resolver] | None = wire_field(None)
    # An empty list for a suffix means "answered by 100.100.100.100" (split DNS).
    Routes: dict[str, list[Resolver] | None] | None = wire_field(None)
    FallbackResolvers: list[Resolver] | None = wire_field(None)
    Domains: list[str] | None = wire_field(None)
    Proxied: bool = wire_field(False)
    Nameservers: list[str] | None = wire_field(None)
    CertDomains: list[str] | None = wire_field(None)
    ExtraRecords: list[DNSRecord] | None = wire_field(None)
    ExitNodeFilteredSet: list[str] | None = wire_field(None)
    TempCorpIssue13969: str = wire_field("")


# --- DERP map -------------------------------------------------------------------


class DERPNode(Wire):
    Name: str = wire_field("", omit=NEVER)
    RegionID: int = wire_field(0, omit=NEVER)
    HostName: str = wire_field("", omit=NEVER)
    CertName: str = wire_field("")
    IPv4: str = wire_field("")
    IPv6: str = wire_field("")
    STUNPort: int = wire_field(0)
    STUNOnly: bool = wire_field(False)
    DERPPort: int = wire_field(0)
    InsecureForTests: bool = wire_field(False)
    STUNTestIP: str = wire_field("")
    CanPort80: bool = wire_field(False)


class DERPRegion(Wire):
    RegionID: int = wire_field(0, omit=NEVER)
    RegionCode: str = wire_field("", omit=NEVER)
    RegionName: str = wire_field("", omit=NEVER)
    Latitude: float = wire_field(0.0)
    Longitude: float = wire_field(0.0)
    Avoid: bool = wire_field(False)
    NoMeasureNoHome: bool = wire_field(False)
    Nodes: list[DERPNode] | None = wire_field(None, omit=NEVER)


class DERPHomeParams(Wire):
    RegionScore: dict[int, float] | None = wire_field(None)


class DERPMap(Wire):
    HomeParams: DERPHomeParams | None = wire_field(None)
    # Never put a None region in here: older clients crash on it (PROTOCOL.md 7.2.17).
    Regions: dict[int, DERPRegion] | None = wire_field(None, omit=NEVER)
    omitDefaultRegions: bool = wire_field(False)


# --- packet filter --------------------------------------------------------------


class PortRange(Wire):
    First: int = wire_field(0, omit=NEVER)
    Last: int = wire_field(0, omit=NEVER)


class NetPortRange(Wire):
    IP: str = wire_field("", omit=NEVER)
    Bits: int | None = wire_field(None)
    Ports: PortRange = wire_field(default_factory=lambda: PortRange(), omit=NEVER)


class CapGrant(Wire):
    Dsts: list[str] | None = wire_field(None, omit=NEVER)
    Caps: list[str] | None = wire_field(None)
    CapMap: dict[str, Any] | None = wire_field(None)


class FilterRule(Wire):
    SrcIPs: list[str] | None = wire_field(None, omit=NEVER)
    SrcBits: list[int] | None = wire_field(None)
    DstPorts: list[NetPortRange] | None = wire_field(None)
    IPProto: list[int] | None = wire_field(None)
    CapGrant: list[CapGrant] | None = wire_field(None)


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
    node: str = wire_field("")
    nodeIP: str = wire_field("")
    userLogin: str = wire_field("")
    any: bool = wire_field(False)
    pubKeys: list[str] | None = wire_field(None)


class SSHRecorderFailureAction(Wire):
    RejectSessionWithMessage: str = wire_field("")
    TerminateSessionWithMessage: str = wire_field("")
    NotifyURL: str = wire_field("")


class SSHAction(Wire):
    message: str = wire_field("")
    reject: bool = wire_field(False)
    accept: bool = wire_field(False)
    # time.Duration: integer nanoseconds.
    sessionDuration: int = wire_field(0)
    allowAgentForwarding: bool = wire_field(False)
    holdAndDelegate: str = wire_field("")
    allowLocalPortForwarding: bool = wire_field(False)
    allowRemotePortForwarding: bool = wire_field(False)
    recorders: list[str] | None = wire_field(None)
    onRecordingFailure: SSHRecorderFailureAction | None = wire_field(None)


class SSHRule(Wire):
    ruleExpires: datetime | None = wire_field(None)
    principals: list[SSHPrincipal] | None = wire_field(None, omit=NEVER)
    sshUsers: dict[str, str] | None = wire_field(None, omit=NEVER)
    action: SSHAction | None = wire_field(None, omit=NEVER)
    acceptEnv: list[str] | None = wire_field(None)


class SSHPolicy(Wire):
    rules: list[SSHRule] | None = wire_field(None, omit=NEVER)


# --- nodes and users ------------------------------------------------------------


class UserProfile(Wire):
    ID: int = wire_field(0, omit=NEVER)
    LoginName: str = wire_field("", omit=NEVER)
    DisplayName: str = wire_field("", omit=NEVER)
    ProfilePicURL: str = wire_field("")


class Node(Wire):
    ID: int = wire_field(0, omit=NEVER)
    StableID: str = wire_field("", omit=NEVER)
    # FQDN with the trailing dot; the client derives the MagicDNS suffix from it.
    Name: str = wire_field("", omit=NEVER)
    User: int = wire_field(0, omit=NEVER)
    Sharer: int = wire_field(0)
    Key: NodePublic = _key(NodePublic)
    KeyExpiry: datetime = _time()
    KeySignature: bytes | None = wire_field(None)
    Machine: MachinePublic = _key(MachinePublic)
    DiscoKey: DiscoPublic = _key(DiscoPublic)
    Addresses: list[str] | None = wire_field(None, omit=NEVER)
    AllowedIPs: list[str] | None = wire_field(None, omit=NEVER)
    Endpoints: list[str] | None = wire_field(None)
    LegacyDERPString: str = wire_field("", json="DERP")
    HomeDERP: int = wire_field(0)
    # A HostinfoView: null when unset, which some client code dereferences, so
    # the netmap builder should always fill it.
    Hostinfo: Hostinfo | None = wire_field(None, omit=NEVER)
    Created: datetime = _time()
    Cap: int = wire_field(0)
    Tags: list[str] | None = wire_field(None)
    PrimaryRoutes: list[str] | None = wire_field(None)
    LastSeen: datetime | None = wire_field(None)
    Online: bool | None = wire_field(None)
    MachineAuthorized: bool = wire_field(False)
    Capabilities: list[str] | None = wire_field(None)
    CapMap: dict[str, Any] | None = wire_field(None)
    UnsignedPeerAPIOnly: bool = wire_field(False)
    # Computed by the client; present in client-side dumps, never sent by a server.
    ComputedName: str = wire_field("")
    ComputedNameWithHost: str = wire_field("")
    DataPlaneAuditLogID: str = wire_field("")
    Expired: bool = wire_field(False)
    SelfNodeV4MasqAddrForThisPeer: str | None = wire_field(None)
    SelfNodeV6MasqAddrForThisPeer: str | None = wire_field(None)
    IsWireGuardOnly: bool = wire_field(False)
    IsJailed: bool = wire_field(False)
    ExitNodeDNSResolvers: list[Resolver] | None = wire_field(None)


class PeerChange(Wire):
    NodeID: int = wire_field(0, omit=NEVER)
    DERPRegion: int = wire_field(0)
    Cap: int = wire_field(0)
    CapMap: dict[str, Any] | None = wire_field(None)
    Endpoints: list[str] | None = wire_field(None)
    Key: NodePublic | None = wire_field(None)
    KeySignature: bytes | None = wire_field(None)
    DiscoKey: DiscoPublic | None = wire_field(None)
    Online: bool | None = wire_field(None)
    LastSeen: datetime | None = wire_field(None)
    KeyExpiry: datetime | None = wire_field(None)


# --- map request / response -----------------------------------------------------


class MapRequest(Wire):
    Version: int = wire_field(0, omit=NEVER)
    Compress: str = wire_field("", omit=NEVER)
    KeepAlive: bool = wire_field(False, omit=NEVER)
    NodeKey: NodePublic = _key(NodePublic)
    DiscoKey: DiscoPublic = _key(DiscoPublic)
    HardwareAttestationKey: HardwareAttestationPublic = _key(HardwareAttestationPublic, ZERO)
    HardwareAttestationKeySignature: bytes | None = wire_field(None)
    HardwareAttestationKeySignatureTimestamp: datetime = _time(ZERO)
    Stream: bool = wire_field(False, omit=NEVER)
    Hostinfo: Hostinfo | None = wire_field(None, omit=NEVER)
    MapSessionHandle: str = wire_field("")
    MapSessionSeq: int = wire_field(0)
    Endpoints: list[str] | None = wire_field(None)
    EndpointTypes: list[int] | None = wire_field(None)
    TKAHead: str = wire_field("")
    ReadOnly: bool = wire_field(False)
    OmitPeers: bool = wire_field(False)
    DebugFlags: list[str] | None = wire_field(None)
    ConnectionHandleForTest: str = wire_field("")


class PingRequest(Wire):
    URL: str = wire_field("", omit=NEVER)
    URLIsNoise: bool = wire_field(False)
    Log: bool = wire_field(False)
    Types: str = wire_field("")
    IP: str = wire_field("", omit=NEVER)
    Payload: bytes | None = wire_field(None)


class Debug(Wire):
    SleepSeconds: float = wire_field(0.0)
    DisableLogTail: bool = wire_field(False)
    # Never set by homescale: the client calls os.Exit with it.
    Exit: int | None = wire_field(None)


class ClientVersion(Wire):
    RunningLatest: bool = wire_field(False)
    LatestVersion: str = wire_field("")
    UrgentSecurityUpdate: bool = wire_field(False)
    Notify: bool = wire_field(False)
    NotifyURL: str = wire_field("")
    NotifyText: str = wire_field("")


class ControlIPCandidate(Wire):
    IP: str = wire_field("", omit=ZERO)
    ACEHost: str = wire_field("")
    DialStartDelaySec: float = wire_field(0.0)
    DialTimeoutSec: float = wire_field(0.0)
    Priority: int = wire_field(0)


class ControlDialPlan(Wire):
    Candidates: list[ControlIPCandidate] | None = wire_field(None, omit=NEVER)


class DisplayMessageAction(Wire):
    URL: str = wire_field("", omit=NEVER)
    Label: str = wire_field("", omit=NEVER)


class DisplayMessage(Wire):
    Title: str = wire_field("", omit=NEVER)
    Text: str = wire_field("", omit=NEVER)
    Severity: str = wire_field("", omit=NEVER)
    ImpactsConnectivity: bool = wire_field(False)
    PrimaryAction: DisplayMessageAction | None = wire_field(None)


class MapResponse(Wire):
    MapSessionHandle: str = wire_field("")
    Seq: int = wire_field(0)
    KeepAlive: bool = wire_field(False)
    PingRequest: PingRequest | None = wire_field(None)
    PopBrowserURL: str = wire_field("")
    Node: Node | None = wire_field(None)
    DERPMap: DERPMap | None = wire_field(None)
    # Non-empty Peers replaces the whole peer set (map.go); deltas use the next three.
    Peers: list[Node] | None = wire_field(None)
    PeersChanged: list[Node] | None = wire_field(None)
    PeersRemoved: list[int] | None = wire_field(None)
    PeersChangedPatch: list[PeerChange] | None = wire_field(None)
    PeerSeenChange: dict[int, bool] | None = wire_field(None)
    OnlineChange: dict[int, bool] | None = wire_field(None)
    DNSConfig: DNSConfig | None = wire_field(None)
    Domain: str = wire_field("")
    CollectServices: bool | None = wire_field(None)
    # Deliberately not Go's omitempty: a present-but-empty PacketFilter means
    # "block everything" to the client, which Go's encoder cannot express but a
    # server must be able to. None = unchanged (absent).
    PacketFilter: list[FilterRule] | None = wire_field(None, omit=NIL)
    PacketFilters: dict[str, list[FilterRule] | None] | None = wire_field(None)
    UserProfiles: list[UserProfile] | None = wire_field(None)
    Health: list[str] | None = wire_field(None)
    DisplayMessages: dict[str, DisplayMessage | None] | None = wire_field(None)
    SSHPolicy: SSHPolicy | None = wire_field(None)
    ControlTime: datetime | None = wire_field(None)
    TKAInfo: Any = wire_field(None)
    DomainDataPlaneAuditLogID: str = wire_field("")
    Debug: Debug | None = wire_field(None)
    ControlDialPlan: ControlDialPlan | None = wire_field(None)
    ClientVersion: ClientVersion | None = wire_field(None)
    DefaultAutoUpdate: bool | None = wire_field(None)


# --- other Noise endpoints -------------------------------------------------------


class EarlyNoise(Wire):
    nodeKeyChallenge: ChallengePublic = _key(ChallengePublic)


class OverTLSPublicKeyResponse(Wire):
    """The body of ``GET /key?v=N``; a zero legacy key is what headscale sends."""

    legacyPublicKey: MachinePublic = _key(MachinePublic)
    publicKey: MachinePublic = _key(MachinePublic)


class SetDNSRequest(Wire):
    Version: int = wire_field(0, omit=NEVER)
    NodeKey: NodePublic = _key(NodePublic)
    Name: str = wire_field("", omit=NEVER)
    Type: str = wire_field("", omit=NEVER)
    Value: str = wire_field("", omit=NEVER)


class TokenRequest(Wire):
    CapVersion: int = wire_field(0, omit=NEVER)
    NodeKey: NodePublic = _key(NodePublic)
    Audience: str = wire_field("", omit=NEVER)


class TokenResponse(Wire):
    id_token: str = wire_field("", omit=NEVER)


class HealthChangeRequest(Wire):
    Subsys: str = wire_field("", omit=NEVER)
    Error: str = wire_field("", omit=NEVER)
    NodeKey: NodePublic = _key(NodePublic)
