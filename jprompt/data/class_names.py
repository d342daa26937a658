"""Class names for CLIP text prompts, where tfds's are numbers, ids or not words.

The presets (``jprompt.data.presets``) name their classes with these lists, or with a rule of
``TFDS_NAME_RULES`` applied to the builder's own names at run time. ``PGN_CLASS_NAMES`` are the
names PGN's code puts into its template, stated here so that a PGN config loads without
TensorFlow. No TensorFlow here.
"""

import re


def digits(first: int, last: int) -> tuple[str, ...]:
    return tuple(str(n) for n in range(first, last + 1))


def _listed(text: str) -> tuple[str, ...]:
    """Comma-separated names, line breaks inside a name read as spaces."""
    return tuple(" ".join(name.split()) for name in text.split(","))


CIFAR10_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# The fine labels in CIFAR-100's label order (alphabetical), as in its fine_label_names.txt.
_CIFAR100_WORDS = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy
    bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
    crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
    keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
    mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
    porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
    snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
    tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"""
CIFAR100_NAMES = tuple(_CIFAR100_WORDS.split())
DIGIT_NAMES = digits(0, 9)
COUNT_NAMES = digits(3, 10)  # CLEVR's 3 to 10 objects


def _sun397_name(name: str) -> str:
    """``/b/bakery/shop`` -> ``bakery shop``: drop the letter folder, keep the words."""
    return " ".join(name.strip("/").split("/")[1:]).replace("_", " ")


def _split_camel_case(name: str) -> str:
    """``ApplyEyeMakeup`` -> ``Apply Eye Makeup`` (UCF101, EuroSAT)."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)


TFDS_NAME_RULES = {"sun397": _sun397_name, "camel_case": _split_camel_case}

# PGN's dataset -> its class names in its label order, as they enter its template. Made from
# tfds's label list of the dataset, ordered as CoOp orders the classes (sorted class folders for
# DTD, EuroSAT and Food101; tfds's Food101 list has cheesecake before cheese_plate; Oxford Pets'
# class ids and SUN397's ClassName.txt as tfds lists them; RESISC45 in the order of PGN's split
# file, tfds's), renamed as CoOp renames (datasets/eurosat.py NEW_CNAMES; datasets/sun397.py
# drops the letter folder and puts words like "indoor" first), then as PGN's datamodules write
# them: "_" as a space, lower case. The other PGN datasets use their preset's names, or (Flowers,
# UCF101: CoOp's cat_to_name.json and classInd.txt, which tfds's lists do not reproduce) the
# split file's, read at run time.
PGN_CLASS_NAMES = {
    "dtd": _listed(
        """
    banded, blotchy, braided, bubbly, bumpy, chequered, cobwebbed, cracked, crosshatched,
    crystalline, dotted, fibrous, flecked, freckled, frilly, gauzy, grid, grooved, honeycombed,
    interlaced, knitted, lacelike, lined, marbled, matted, meshed, paisley, perforated, pitted,
    pleated, polka-dotted, porous, potholed, scaly, smeared, spiralled, sprinkled, stained,
    stratified, striped, studded, swirly, veined, waffled, woven, wrinkled, zigzagged"""
    ),
    "eurosat": _listed(
        """
    annual crop land, forest, herbaceous vegetation land, highway or road, industrial buildings,
    pasture land, permanent crop land, residential buildings, river, sea or lake"""
    ),
    "food101": _listed(
        """
    apple pie, baby back ribs, baklava, beef carpaccio, beef tartare, beet salad, beignets,
    bibimbap, bread pudding, breakfast burrito, bruschetta, caesar salad, cannoli, caprese
    salad, carrot cake, ceviche, cheese plate, cheesecake, chicken curry, chicken quesadilla,
    chicken wings, chocolate cake, chocolate mousse, churros, clam chowder, club sandwich, crab
    cakes, creme brulee, croque madame, cup cakes, deviled eggs, donuts, dumplings, edamame,
    eggs benedict, escargots, falafel, filet mignon, fish and chips, foie gras, french fries,
    french onion soup, french toast, fried calamari, fried rice, frozen yogurt, garlic bread,
    gnocchi, greek salad, grilled cheese sandwich, grilled salmon, guacamole, gyoza, hamburger,
    hot and sour soup, hot dog, huevos rancheros, hummus, ice cream, lasagna, lobster bisque,
    lobster roll sandwich, macaroni and cheese, macarons, miso soup, mussels, nachos, omelette,
    onion rings, oysters, pad thai, paella, pancakes, panna cotta, peking duck, pho, pizza, pork
    chop, poutine, prime rib, pulled pork sandwich, ramen, ravioli, red velvet cake, risotto,
    samosa, sashimi, scallops, seaweed salad, shrimp and grits, spaghetti bolognese, spaghetti
    carbonara, spring rolls, steak, strawberry shortcake, sushi, tacos, takoyaki, tiramisu, tuna
    tartare, waffles"""
    ),
    "oxford_iiit_pet": _listed(
        """
    abyssinian, american bulldog, american pit bull terrier, basset hound, beagle, bengal,
    birman, bombay, boxer, british shorthair, chihuahua, egyptian mau, english cocker spaniel,
    english setter, german shorthaired, great pyrenees, havanese, japanese chin, keeshond,
    leonberger, maine coon, miniature pinscher, newfoundland, persian, pomeranian, pug, ragdoll,
    russian blue, saint bernard, samoyed, scottish terrier, shiba inu, siamese, sphynx,
    staffordshire bull terrier, wheaten terrier, yorkshire terrier"""
    ),
    "sun397": _listed(
        """
    abbey, airplane cabin, airport terminal, alley, amphitheater, amusement arcade, amusement
    park, anechoic chamber, outdoor apartment building, indoor apse, aquarium, aqueduct, arch,
    archive, outdoor arrival gate, art gallery, art school, art studio, assembly line, outdoor
    athletic field, public atrium, attic, auditorium, auto factory, badlands, indoor badminton
    court, baggage claim, shop bakery, exterior balcony, interior balcony, ball pit, ballroom,
    bamboo forest, banquet hall, bar, barn, barndoor, baseball field, basement, basilica,
    outdoor basketball court, bathroom, batters box, bayou, indoor bazaar, outdoor bazaar,
    beach, beauty salon, bedroom, berth, biology laboratory, indoor bistro, boardwalk, boat
    deck, boathouse, bookstore, indoor booth, botanical garden, indoor bow window, outdoor bow
    window, bowling alley, boxing ring, indoor brewery, bridge, building facade, bullring,
    burial chamber, bus interior, butchers shop, butte, outdoor cabin, cafeteria, campsite,
    campus, natural canal, urban canal, candy store, canyon, backseat car interior, frontseat
    car interior, carrousel, indoor casino, castle, catacomb, indoor cathedral, outdoor
    cathedral, indoor cavern, cemetery, chalet, cheese factory, chemistry lab, indoor chicken
    coop, outdoor chicken coop, childs room, indoor church, outdoor church, classroom, clean
    room, cliff, indoor cloister, closet, clothing store, coast, cockpit, coffee shop, computer
    room, conference center, conference room, construction site, control room, outdoor control
    tower, corn field, corral, corridor, cottage garden, courthouse, courtroom, courtyard,
    exterior covered bridge, creek, crevasse, crosswalk, office cubicle, dam, delicatessen,
    dentists office, sand desert, vegetation desert, indoor diner, outdoor diner, home dinette,
    vehicle dinette, dining car, dining room, discotheque, dock, outdoor doorway, dorm room,
    driveway, outdoor driving range, drugstore, electrical substation, door elevator, interior
    elevator, elevator shaft, engine room, indoor escalator, excavation, indoor factory,
    fairway, fastfood restaurant, cultivated field, wild field, fire escape, fire station,
    indoor firing range, fishpond, indoor florist shop, food court, broadleaf forest, needleleaf
    forest, forest path, forest road, formal garden, fountain, galley, game room, indoor garage,
    garbage dump, gas station, exterior gazebo, indoor general store, outdoor general store,
    gift shop, golf course, indoor greenhouse, outdoor greenhouse, indoor gymnasium, indoor
    hangar, outdoor hangar, harbor, hayfield, heliport, herb garden, highway, hill, home office,
    hospital, hospital room, hot spring, outdoor hot tub, outdoor hotel, hotel room, house,
    outdoor hunting lodge, ice cream parlor, ice floe, ice shelf, indoor ice skating rink,
    outdoor ice skating rink, iceberg, igloo, industrial area, outdoor inn, islet, indoor
    jacuzzi, indoor jail, jail cell, jewelry shop, kasbah, indoor kennel, outdoor kennel,
    kindergarden classroom, kitchen, kitchenette, outdoor labyrinth, natural lake, landfill,
    landing deck, laundromat, lecture room, indoor library, outdoor library, outdoor lido deck,
    lift bridge, lighthouse, limousine interior, living room, lobby, lock chamber, locker room,
    mansion, manufactured home, indoor market, outdoor market, marsh, martial arts gym,
    mausoleum, medina, water moat, outdoor monastery, indoor mosque, outdoor mosque, motel,
    mountain, mountain snowy, indoor movie theater, indoor museum, music store, music studio,
    outdoor nuclear power plant, nursery, oast house, outdoor observatory, ocean, office, office
    building, outdoor oil refinery, oilrig, operating room, orchard, outdoor outhouse, pagoda,
    palace, pantry, park, indoor parking garage, outdoor parking garage, parking lot, parlor,
    pasture, patio, pavilion, pharmacy, phone booth, physics laboratory, picnic area, indoor
    pilothouse, outdoor planetarium, playground, playroom, plaza, indoor podium, outdoor podium,
    pond, establishment poolroom, home poolroom, outdoor power plant, promenade deck, indoor
    pub, pulpit, putting green, racecourse, raceway, raft, railroad track, rainforest,
    reception, recreation room, residential neighborhood, restaurant, restaurant kitchen,
    restaurant patio, rice paddy, riding arena, river, rock arch, rope bridge, ruin, runway,
    sandbar, sandbox, sauna, schoolhouse, sea cliff, server room, shed, shoe shop, shopfront,
    indoor shopping mall, shower, skatepark, ski lodge, ski resort, ski slope, sky, skyscraper,
    slum, snowfield, squash court, stable, baseball stadium, football stadium, indoor stage,
    staircase, street, subway interior, platform subway station, supermarket, sushi bar, swamp,
    indoor swimming pool, outdoor swimming pool, indoor synagogue, outdoor synagogue, television
    studio, east asia temple, south asia temple, indoor tennis court, outdoor tennis court,
    outdoor tent, indoor procenium theater, indoor seats theater, thriftshop, throne room,
    ticket booth, toll plaza, topiary garden, tower, toyshop, outdoor track, train railway,
    platform train station, tree farm, tree house, trench, coral reef underwater, utility room,
    valley, van interior, vegetable garden, veranda, veterinarians office, viaduct, videostore,
    village, vineyard, volcano, indoor volleyball court, outdoor volleyball court, waiting room,
    indoor warehouse, water tower, block waterfall, fan waterfall, plunge waterfall, watering
    hole, wave, wet bar, wheat field, wind farm, windmill, barrel storage wine cellar, bottle
    storage wine cellar, indoor wrestling ring, yard, youth hostel"""
    ),
    "resisc45": _listed(
        """
    airplane, airport, baseball diamond, basketball court, beach, bridge, chaparral, church,
    circular farmland, cloud, commercial area, dense residential, desert, forest, freeway, golf
    course, ground track field, harbor, industrial area, intersection, island, lake, meadow,
    medium residential, mobile home park, mountain, overpass, palace, parking lot, railway,
    railway station, rectangular farmland, river, roundabout, runway, sea ice, ship, snowberg,
    sparse residential, stadium, storage tank, tennis court, terrace, thermal power station,
    wetland"""
    ),
}
